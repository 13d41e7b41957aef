"""Side-by-side benchmark: inat vs the typical published solution (shared/bench/peer_baseline.py).

Same data, image size and model width (5 blocks of 32 filters, dense 128), run in one
process tree, alternating, so machine noise hits both alike. Prints and saves ratios:

1. training throughput (images/s), steady state (cache built and first epoch excluded for
   inat; the peer decodes JPEGs every epoch by design, so all its epochs are alike);
2. test accuracy after a training budget (default 10 minutes) with inat's default recipe;
3. peak resident memory of each main process (wait4 rusage; the peer's DataLoader worker
   processes are not included, which flatters the peer).

    python experiments/bench/benchmark.py --data ../shared/datasets/imagewoof10 --out experiments/bench/result.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER = REPO.parent / "shared" / "bench" / "peer_baseline.py"


def run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run a command; return (exit code, wall seconds, peak RSS in MiB of the process itself)."""
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss / 1024


def inat_cmd(data: str, size: int, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", f"data.root={data}", f"data.image_size={size}", f"hydra.run.dir={run_dir}",
            "wandb.mode=disabled", "filters.base=32", "model.dense_units=128", *extra]


def peer_cmd(data: str, size: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PEER), data, "--size", str(size), "--out", str(out), *extra]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "imagewoof10"))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2, help="alternating throughput rounds")
    p.add_argument("--budget-min", type=float, default=10.0, help="training budget for the accuracy comparison")
    p.add_argument("--skip-peer-accuracy", action="store_true", help="reuse the issue's 41.7%% instead of rerunning")
    p.add_argument("--out", default=str(REPO / "experiments" / "bench" / "result.json"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inat_bench_"))
    import torch

    from inat.machine import cpu_features, cpu_model

    result: dict = {"data": a.data, "size": a.size, "host": platform.node(), "cpu": cpu_model(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": cpu_features(),
                    "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    # Build inat's decode cache first: it is paid once per dataset and size, not per run.
    code, wall, _ = run(inat_cmd(a.data, a.size, work / "warm", "train.epochs=1", "train.then_test=false"), work / "warm.log")
    assert code == 0, (work / "warm.log").read_text()[-2000:]
    result["inat_first_run_wall_s_incl_cache"] = round(wall, 1)
    inat_ips, peer_ips, inat_rss, peer_rss = [], [], [], []
    for r in range(a.rounds):
        run_dir = work / f"inat_tp{r}"
        code, _, rss = run(inat_cmd(a.data, a.size, run_dir, "train.epochs=3", "train.then_test=false"), work / f"inat{r}.log")
        assert code == 0, (work / f"inat{r}.log").read_text()[-2000:]
        rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
        inat_ips.append(max(float(row["images_per_sec"]) for row in rows[1:]))
        inat_rss.append(rss)
        out = work / f"peer{r}.json"
        code, _, rss = run(peer_cmd(a.data, a.size, out, "--epochs", "1"), work / f"peer{r}.log")
        assert code == 0, (work / f"peer{r}.log").read_text()[-2000:]
        peer_ips.append(json.loads(out.read_text())["train_images_per_sec"])
        peer_rss.append(rss)
        print(f"round {r + 1}: inat {inat_ips[-1]:.0f} img/s, peer {peer_ips[-1]:.0f} img/s", flush=True)
    result.update(inat_images_per_sec=inat_ips, peer_images_per_sec=peer_ips,
                  throughput_ratio=round(sorted(inat_ips)[len(inat_ips) // 2] / sorted(peer_ips)[len(peer_ips) // 2], 2),
                  inat_peak_rss_mib=round(max(inat_rss)), peer_peak_rss_mib_main_process=round(max(peer_rss)))
    budget_dir = work / "inat_budget"
    code, wall, rss = run(inat_cmd(a.data, a.size, budget_dir, f"train.max_minutes={a.budget_min}", "train.epochs=40"),
                          work / "inat_budget.log")
    assert code == 0, (work / "inat_budget.log").read_text()[-2000:]
    test = json.loads((budget_dir / "test" / "test.json").read_text())
    summary = json.loads((budget_dir / "summary.json").read_text())
    result.update(inat_test_accuracy=test["accuracy"], inat_budget_epochs=summary["epochs"],
                  inat_budget_train_seconds=summary["train_seconds"], inat_budget_wall_s=round(wall, 1),
                  inat_precision=summary.get("precision"), inat_precision_reason=summary.get("precision_reason"))
    keep = Path(a.out).parent / "inat_budget_run"  # the run's compact evidence (no checkpoints;
    keep.mkdir(parents=True, exist_ok=True)        # summary.json holds the resolved config)
    for name in ("summary.json", "metrics.csv", "test/test.json"):
        src = budget_dir / name
        if src.is_file():
            dst = keep / Path(name.replace("test/", ""))
            dst.write_text(src.read_text().replace(str(budget_dir), "<run_dir>").replace(str(REPO.parent), "<work>"))
    if not a.skip_peer_accuracy:
        out = work / "peer_budget.json"
        code, wall, rss = run(peer_cmd(a.data, a.size, out, "--budget-s", str(a.budget_min * 60)), work / "peer_budget.log")
        assert code == 0, (work / "peer_budget.log").read_text()[-2000:]
        peer = json.loads(out.read_text())
        result.update(peer_test_accuracy=peer["test_accuracy"], peer_budget_epochs=peer["epochs"])
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["command"] = " ".join(shlex.quote(c) for c in sys.argv)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
