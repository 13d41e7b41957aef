"""Ablation of the from-scratch recipe: what each ingredient is worth, mean ± std over seeds.

Each variant removes (or adds) one ingredient from the default recipe and trains the same
5 x 32-filter CNN on the same data under the same short training budget, for several
seeds; the test folder is scored once per run (test mode, after training).

    python experiments/ablation/ablation.py --data ../shared/datasets/imagewoof10 --size 64 \
        --epochs 4 --seeds 0 1 2 --out experiments/ablation/result.json   # or --minutes M
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scipy import stats

REPO = Path(__file__).resolve().parents[2]
CONFIDENCE = 0.95  # of the Welch interval of each difference from the first variant

VARIANTS = {
    "default recipe": [],
    "- label smoothing": ["optim.label_smoothing=0"],
    "- augmentation (flip+shift, TTA)": ["aug=none"],
    "- test-time flip only": ["aug.tta_flip=false"],
    "- one-cycle (constant lr, no warmup)": ["optim.schedule=constant", "optim.warmup_epochs=0"],
    "+ EMA of weights (0.99)": ["train.ema=0.99"],
    "Adam 1e-4, no wd (peer optimiser)": ["optim.name=adam", "train.lr=1e-4", "optim.weight_decay=0",
                                          "optim.schedule=constant", "optim.warmup_epochs=0", "optim.label_smoothing=0"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "imagewoof10"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--minutes", type=float, default=1.5)
    p.add_argument("--epochs", type=int, default=0,
                   help="train a fixed number of epochs instead of a time budget (immune to machine load)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", default=str(REPO / "experiments" / "ablation" / "result.json"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inat_ablation_"))
    rows = []
    for seed in a.seeds:  # seeds outermost: machine noise spreads over all variants alike
        for name in a.variants:
            run_dir = work / f"{abs(hash(name))}_{seed}"
            cmd = [sys.executable, "run.py", f"data.root={a.data}", f"data.image_size={a.size}", f"seed={seed}",
                   *([f"train.max_minutes=0", f"train.epochs={a.epochs}"] if a.epochs else
                     [f"train.max_minutes={a.minutes}", "train.epochs=40"]), "wandb.mode=disabled",
                   f"hydra.run.dir={run_dir}", *VARIANTS[name]]
            print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
            test = json.loads((run_dir / "test" / "test.json").read_text())
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"variant": name, "seed": seed, "test_accuracy": test["accuracy"],
                         "best_val_accuracy": summary["best_val_accuracy"], "epochs": summary["epochs"],
                         "images_per_sec": summary["train_images_per_sec"], "precision": summary.get("precision"),
                         "overrides": VARIANTS[name]})
            machine = {k: summary["environment"].get(k) for k in ("cpu", "cpu_count", "cpu_capability", "torch")}
            print(f"  {name} seed {seed}: test {test['accuracy']:.1%}, {summary['epochs']} epochs", flush=True)
    table = []
    base_accs = [r["test_accuracy"] for r in rows if r["variant"] == a.variants[0]]
    for name in a.variants:
        accs = [r["test_accuracy"] for r in rows if r["variant"] == name]
        entry = {"variant": name, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 "n": len(accs), "overrides": VARIANTS[name]}
        if name != a.variants[0] and len(accs) > 1 and len(base_accs) > 1:
            # the difference from the first variant with its Welch t interval; one that holds 0 is a tie
            ci = stats.ttest_ind(accs, base_accs, equal_var=False).confidence_interval(CONFIDENCE)
            entry.update(diff=entry["mean"] - statistics.mean(base_accs), diff_ci95=[float(ci.low), float(ci.high)],
                         tie=bool(ci.low <= 0 <= ci.high))
        table.append(entry)
    result = {"command": " ".join(shlex.quote(c) for c in sys.argv), "data": a.data, "size": a.size,
              "minutes": None if a.epochs else a.minutes, "epochs": a.epochs or None, "seeds": a.seeds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {**machine, "precision": sorted({str(r["precision"]) for r in rows})},
              "table": table, "runs": rows}
    Path(a.out).write_text(json.dumps(result, indent=1))
    base = table[0]["mean"]
    print(f"\n| variant | test accuracy (mean ± std, n={len(a.seeds)}) | vs default |\n|---|---|---|")
    for t in table:
        ci = t.get("diff_ci95")
        vs = (f"{100 * (t['mean'] - base):+.1f} pts (95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"
              f"{', a tie' if t['tie'] else ''})") if ci else ""
        print(f"| {t['variant']} | {t['mean']:.1%} ± {t['std']:.1%} | {vs} |")


if __name__ == "__main__":
    main()
