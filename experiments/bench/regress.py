"""Did a change cost CPU training speed? inat at two commits and the peer, side by side.

Each round trains inat at ``--old`` (a git worktree of that commit) and at this checkout
for ``--epochs`` epochs through ``run.py`` (the stable interface: the engine's internals may
differ between the two commits), and the peer (``shared/bench/peer_baseline.py``) for one
epoch, alternating, so machine noise hits all three alike. inat's number is its best
epoch after the first (the first carries start-up); the peer decodes every epoch by design.
Each build of inat's decode cache is paid in an untimed warm-up run of each commit.

    python experiments/bench/regress.py --old 0de0123 --out experiments/bench/regress.json
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 python experiments/bench/regress.py ...  # an AVX2 CPU, approximately

Nothing else may run on the machine meanwhile: the numbers are only comparable side by side.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments" / "bench"))

from benchmark import PEER, peer_cmd, run  # noqa: E402  (the same runner and peer command)
from variants import cpu_name  # noqa: E402


def inat_run(tree: Path, data: str, size: int, run_dir: Path, epochs: int, log: Path, precision: str) -> float:
    """Best training img/s after the first epoch of ``run.py`` in ``tree`` (its precision: ``precision_of``)."""
    cmd = [sys.executable, str(tree / "run.py"), f"data.root={data}", f"data.image_size={size}",
           f"hydra.run.dir={run_dir}", "wandb.mode=disabled", "filters.base=32", "model.dense_units=128",
           f"train.epochs={epochs}", "train.max_minutes=0", "train.then_test=false", f"train.precision={precision}"]
    code, _, _ = run(cmd, log)
    assert code == 0, log.read_text()[-2000:]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return max(float(row["images_per_sec"]) for row in rows[1:])


def precision_of(run_dir: Path) -> str:
    """The precision ``train.precision=auto`` chose for a run, from its summary.json."""
    return json.loads((run_dir / "summary.json").read_text())["precision"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, help="the commit to compare with")
    p.add_argument("--new", default=None, help="the commit to measure (default: this checkout as it is; name one "
                                               "when files here may change during the run)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "imagewoof10"))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    # Under ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 on a bf16 CPU, commits before b15d19c let auto pick
    # bf16 (cpuinfo reports the hardware), which oneDNN then emulates; a real AVX2 CPU gets fp32: pass 32 there.
    p.add_argument("--precision", default="auto", help="train.precision for both commits")
    p.add_argument("--out", default=str(REPO / "experiments" / "bench" / "regress.json"))
    a = p.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="inat_regress_"))
    old_tree = work / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), a.old], check=True,
                   capture_output=True)
    new_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.new or "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
    dirty = a.new is None and bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                                   "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
    new_tree = REPO
    if a.new is not None:
        new_tree = work / "new"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(new_tree), a.new], check=True,
                       capture_output=True)
    trees = {"old": old_tree, "new": new_tree}
    try:
        for name, tree in trees.items():  # decode caches, untimed
            inat_run(tree, a.data, a.size, work / f"warm_{name}", 2, work / f"warm_{name}.log", a.precision)
        ips = {"old": [], "new": [], "peer": []}
        for r in range(a.rounds):
            for name, tree in trees.items():
                ips[name].append(round(inat_run(tree, a.data, a.size, work / f"{name}{r}", a.epochs,
                                                work / f"{name}{r}.log", a.precision), 1))
            out = work / f"peer{r}.json"
            code, _, _ = run(peer_cmd(a.data, a.size, out, "--epochs", "1"), work / f"peer{r}.log")
            assert code == 0, (work / f"peer{r}.log").read_text()[-2000:]
            ips["peer"].append(round(json.loads(out.read_text())["train_images_per_sec"], 1))
            print(f"round {r + 1}: old {ips['old'][-1]}, new {ips['new'][-1]}, peer {ips['peer'][-1]} img/s", flush=True)
    finally:
        for tree in {old_tree, new_tree} - {REPO}:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    median = {k: statistics.median(v) for k, v in ips.items()}
    result = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "bf16_native": torch.cpu._is_avx512_bf16_supported(),
              "precision": {name: precision_of(work / f"{name}0") for name in trees},
              "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA") if k in os.environ},
              "torch": torch.__version__, "data": Path(a.data).name, "size": a.size, "epochs": a.epochs,
              "old": a.old, "new": new_rev + ("+uncommitted" if dirty else ""), "peer": PEER.name,
              "images_per_sec": ips, "median": median,
              "new_over_old": round(median["new"] / median["old"], 3),
              "old_over_peer": round(median["old"] / median["peer"], 2),
              "new_over_peer": round(median["new"] / median["peer"], 2),
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
