"""Part A as one chain: the sweep's best configuration, trained at full fidelity, tested once,
explained, reported. Q4's test accuracy is then the sweep's best model's, not the default recipe's.

Stages 1-2 (the proxy sweep and the promotion of its top k) are experiments/sweep/run_sweep.sh and
promote.sh; their evidence is experiments/sweep/woof*/. This script reads the promoted trial with
the best full-fidelity value (ties: the better proxy value, then the earlier trial) and runs:

3. train it on the whole train/ at --size px for --minutes (train.then_test=true: 4. test once);
5. ``+mode=explain`` on its best checkpoint;
6. ``+mode=report`` over the run and the sweep folders.

    python experiments/partA/chain.py --data ../shared/datasets/imagewoof10
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def best_promoted(promotion: Path) -> dict:
    promoted = json.loads(promotion.read_text())["promoted"]
    return max(promoted, key=lambda p: (p["full_value"], p["proxy_value"], -p["trial"]))


def overrides(params: dict) -> list[str]:
    return [f"{k}={v}" for k, v in params.items()]


def run(cmd: list[str]) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "imagewoof10"))
    p.add_argument("--promotion", default=str(REPO / "experiments" / "sweep" / "woof_promoted" / "promotion.json"))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--work", default=str(REPO / "outputs" / "partA_chain"))
    p.add_argument("--out", default=str(REPO / "experiments" / "partA" / "result.json"))
    a = p.parse_args()
    best = best_promoted(Path(a.promotion))
    work = Path(a.work)
    run_dir = work / "best_full"
    explain_dir = run_dir / "explain"  # inside the run folder, where the report looks for its figures
    py = sys.executable
    t0 = time.time()
    run([py, "run.py", f"data.root={a.data}", f"data.image_size={a.size}", f"train.max_minutes={a.minutes}",
         "train.epochs=40", "wandb.mode=disabled", f"hydra.run.dir={run_dir}", *overrides(best["params"])])
    run([py, "run.py", "+mode=explain", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={explain_dir}"])
    run([py, "run.py", "+mode=report", f"report.inputs=[{run_dir},{REPO / 'experiments/sweep/woof'}]",
         f"report.out={work / 'report.html'}", f"hydra.run.dir={work / 'report'}"])
    summary = json.loads((run_dir / "summary.json").read_text())
    test = json.loads((run_dir / "test" / "test.json").read_text())
    result = {"proxy_trial": best["proxy_trial"], "proxy_value": best["proxy_value"],
              "promoted_value": best["full_value"], "params": best["params"], "size": a.size, "minutes": a.minutes,
              "best_val_accuracy": summary["best_val_accuracy"], "epochs": summary["epochs"],
              "test_accuracy": test["accuracy"], "test_n": test["n"], "macro_f1": test.get("macro_f1"),
              "ece": test.get("ece"), "precision": summary.get("precision"),
              "cpu": summary["environment"].get("cpu"), "cpu_capability": summary["environment"].get("cpu_capability"),
              "wall_minutes": round((time.time() - t0) / 60, 1),
              "command": "python experiments/partA/chain.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
