"""GPU numbers for the README, each through the real engine, in one short run (see run.sh beside this file).

Every row composes conf/ with Hydra as run.py does (the real defaults, ``train.precision=auto``)
and calls ``inat.training.fit`` on a generated image folder: 10 classes x 1,250 JPEGs, which the
engine decodes into its cache and splits 10,000 train / 2,500 val. Rows:

- ``scratch_96``, ``scratch_224``: the scratch CNN's training img/s, steady state (epoch 1 apart);
- ``lite0_224``: EfficientNet-Lite0 partial fine-tuning (k=5) at 224 px, random weights when the
  weight package is absent (the row says so);
- ``epoch_10k_224``: seconds of one whole epoch at 224 px (10,000 train images, validation of
  2,500 and the checkpoint writes), from the same run as ``scratch_224``;
- ``prefetch_96``: ``scratch_96`` with the GPU-resident cache disabled (the prefetch-thread path);
- ``syncs``: host syncs per step in one steady epoch, counted with
  ``torch.cuda.set_sync_debug_mode("warn")``, per recipe.

How epochs are timed after a ``torch.cuda.synchronize`` is in engine_rows.py, beside this file.
Each job (one or two rows) runs in a process of its own under a time cap, and ``--out`` is
rewritten after every row, so a crash, a CUDA error or a hang costs that row only; SIGTERM
(run.sh's ``timeout``) keeps the rows finished so far.

    python experiments/gpu/gpu_bench.py --out $OUT/gpu.json           # on a GPU
    python experiments/gpu/gpu_bench.py --smoke --out /tmp/gpu.json   # the same rows, tiny, on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
for _path in (HERE.parents[1], HERE):  # run as a script, sys.path[0] is experiments/gpu/ only; inat is at the root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from engine_rows import FULL, JOBS, ROWS, SMOKE, run_job, write_json  # noqa: E402 - after the path


def _write_class(args) -> int:
    """Write one class folder of JPEGs: a colour, a class-specific stripe period and noise."""
    import numpy as np
    from PIL import Image

    folder, c, n, px = args
    rng = np.random.default_rng(c)
    folder.mkdir(parents=True, exist_ok=True)
    colour = np.array([(37 * c) % 256, (91 * c + 60) % 256, (151 * c + 120) % 256], dtype=np.int16) // 2
    for i in range(n):
        img = rng.integers(0, 90, (px, px, 3)).astype(np.int16) + colour
        img[:, (np.arange(px) // (3 + c)) % 2 == 0] += 50
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{c}_{i}.jpg", quality=90)
    return n


def make_dataset(root: Path, per_class: int, px: int, classes: int = 10) -> int:
    """``root/train/class_<c>/*.jpg``; returns the number of files."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / "train" / f"class_{c}", c, per_class, px) for c in range(classes)]
    if per_class * classes < 1000:
        return sum(map(_write_class, jobs))
    with ProcessPoolExecutor(min(classes, os.cpu_count() or 1)) as pool:
        return sum(pool.map(_write_class, jobs))


def device_info(smoke: bool) -> Dict[str, Any]:
    """Hardware and versions behind the numbers: the engine's own record, and the GPU's details."""
    import torch

    from inat.training.writer import environment

    cuda = not smoke and torch.cuda.is_available()
    info: Dict[str, Any] = {"smoke": smoke, **environment(torch.device("cuda", 0) if cuda else torch.device("cpu")),
                            "cuda": torch.version.cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(capability=list(torch.cuda.get_device_capability(0)), gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file, rewritten after every row")
    p.add_argument("--smoke", action="store_true", help="the same rows at tiny sizes on the CPU")
    p.add_argument("--work", help="folder for the dataset, caches and run folders (default: a temporary one)")
    p.add_argument("--log", help="the rows' output (default: bench.log beside --out)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all rows (default 210, smoke 600)")
    p.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)  # a child: one job
    p.add_argument("--job-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run, also on a GPU machine
    if a.job:
        return run_job(a.job, Path(a.work), Path(a.job_out), SMOKE if a.smoke else FULL)

    import torch

    out = Path(a.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"device": device_info(a.smoke), "rows": {}}
    if not a.smoke and not torch.cuda.is_available():
        result["error"] = "no GPU is visible; use --smoke to check the rows on the CPU"
        write_json(out, result)
        print(f"error: {result['error']}.", file=sys.stderr)
        return 2
    sizes = SMOKE if a.smoke else FULL
    work = Path(a.work or tempfile.mkdtemp(prefix="inat_gpu_bench_")).absolute()
    t0 = time.perf_counter()
    n = make_dataset(work / "data", sizes["per_class"], sizes["source_px"])
    result["dataset"] = {"files": n, "classes": 10, "source_px": sizes["source_px"], "format": "JPEG q90",
                         "seconds_to_write": round(time.perf_counter() - t0, 1)}
    write_json(out, result)
    run_jobs(result, out, Path(a.log).absolute() if a.log else out.with_name("bench.log"), work, a.smoke,
             a.budget or (600.0 if a.smoke else 210.0))
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out, result)
    if not a.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if not any("error" in r for r in result["rows"].values()) else 1


def run_jobs(result: Dict[str, Any], out: Path, log: Path, work: Path, smoke: bool, budget: float) -> None:
    """Each job in a process of its own under a time cap; ``out`` rewritten after each."""
    deadline = time.monotonic() + budget
    current: Dict[str, Any] = {}

    def on_term(signum, frame):  # run.sh's timeout: keep what the running job finished
        _merge(result, current, f"killed by signal {signum} (run.sh's time limit) while this row ran")
        write_json(out, result)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    log.write_text("")
    for job, (rows, cap) in JOBS.items():
        limit = min(deadline - time.monotonic(), 300 if smoke else cap)
        if limit < 15:
            result["rows"].update({row: {"error": f"not run: the bench's {budget:.0f} s were spent"} for row in rows})
            write_json(out, result)
            continue
        job_out = work / f"{job}.json"
        job_out.unlink(missing_ok=True)
        current.update(rows=rows, job_out=job_out)
        cmd = [sys.executable, str(HERE / "gpu_bench.py"), "--out", str(out), "--job", job, "--work", str(work),
               "--job-out", str(job_out)] + (["--smoke"] if smoke else [])
        started = time.perf_counter()
        with open(log, "a") as fh:
            fh.write(f"\n===== {job} (limit {limit:.0f} s)\n")
            fh.flush()
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=limit).returncode
                why = None if rc == 0 else f"the row's process exited with {rc}"
            except subprocess.TimeoutExpired:
                why = f"timed out after {limit:.0f} s"
        _merge(result, current, why, _tail(log), round(time.perf_counter() - started, 1))
        current.clear()
        write_json(out, result)
        for row in rows:
            print(f"{row}: {_summary_line(result['rows'][row])}", flush=True)


def _merge(result: Dict[str, Any], current: Dict[str, Any], why: Optional[str], tail: str = "",
           seconds: Optional[float] = None) -> None:
    """The job's rows into ``result``; rows it did not finish get an error field."""
    if not current:
        return
    done: Dict[str, Any] = {}
    if current["job_out"].exists():
        try:
            done = json.loads(current["job_out"].read_text())
        except ValueError:
            done = {}
    for row in current["rows"]:
        entry = done.get(row) or {}
        if not entry or ("error" not in entry and entry.get("partial")):
            entry = {**entry, "error": why or "the row's process wrote no result"}
        if "error" in entry and tail:
            entry["log_tail"] = tail
        if seconds is not None:
            entry["job_seconds"] = seconds
        result["rows"][row] = entry
    result["rows"] = {name: result["rows"][name] for name in ROWS if name in result["rows"]}  # the listed order


def _summary_line(row: Dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error'].splitlines()[-1][:200]}"
    if "img_s" in row:
        return f"{row['img_s']} img/s ({row.get('precision')}, {row.get('input')})"
    if "seconds" in row:
        return f"{row['seconds']} s per whole epoch ({row.get('n_train')} train + {row.get('n_val')} val images)"
    if "recipes" in row:
        return ", ".join(f"{k} {v.get('per_step', v.get('error', '?'))}" for k, v in row["recipes"].items())
    return json.dumps(row)[:200]


if __name__ == "__main__":
    sys.exit(main())
