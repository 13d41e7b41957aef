"""Ablation of the from-scratch recipe: what each ingredient is worth, mean ± std over seeds.

Each variant removes (or adds) one ingredient from the default recipe and trains the same
5 x 32-filter CNN on the same data under the same short training budget, for several
seeds; the test folder is scored once per run (test mode, after training).

    python experiments/ablation/ablation.py --data ../shared/datasets/imagewoof10 --size 64 \
        --epochs 4 --seeds 0 1 2 --out experiments/ablation/result.json   # or --minutes M

``--set finetune`` compares the freezing strategies of EfficientNet-Lite0 (offline ImageNet
weights) with each other and with the scratch CNN on flowers5, the same way (the first
variant is the reference of the intervals):

    python experiments/ablation/ablation.py --set finetune --epochs 2 --seeds 0 1 2 \
        --out experiments/finetune/seeds.json

``--set precision`` trains the scratch CNN in bf16 and in fp32 (what ``train.precision=auto``
chooses between) to see whether bf16's speed costs accuracy:

    python experiments/ablation/ablation.py --set precision --size 64 --epochs 4 --seeds 0 1 2 \
        --out experiments/ablation/precision_<cpu>.json

Fixed epochs rather than a time budget make the accuracies immune to other jobs on the
machine; the train seconds each run records are then not a speed comparison.
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

RECIPE = {
    "default recipe": [],
    "- label smoothing": ["optim.label_smoothing=0"],
    "- augmentation (flip+shift, TTA)": ["aug=none"],
    "- test-time flip only": ["aug.tta_flip=false"],
    "- one-cycle (constant lr, no warmup)": ["optim.schedule=constant", "optim.warmup_epochs=0"],
    "+ EMA of weights (0.99)": ["train.ema=0.99"],
    "Adam 1e-4, no wd (peer optimiser)": ["optim.name=adam", "train.lr=1e-4", "optim.weight_decay=0",
                                          "optim.schedule=constant", "optim.warmup_epochs=0", "optim.label_smoothing=0"],
}

# Part B's strategies as experiments/finetune/run_all.sh runs them (160 px, batch 32, lr 2e-3, basic
# augmentation), and the scratch CNN with its CPU defaults (96 px, 5 x 32 filters) for 20 epochs.
# fp32 for Lite0: its depthwise backward is slower in bf16 even on a CPU with native bf16 (docs/finetune.md).
LITE0 = ["model=efficientnet_lite0", "model.input_size=160", "train.batch_size=32", "train.lr=2e-3", "aug=basic",
         "train.precision=32"]
FINETUNE = {
    "Lite0 partial (k=5)": [*LITE0, "finetune=partial_k=5"],
    "Lite0 full (lr_decay 0.6)": [*LITE0, "finetune=full", "finetune.lr_decay=0.6"],
    "Lite0 gradual (every epoch)": [*LITE0, "finetune=gradual", "finetune.every=1"],
    "Lite0 linear probe": [*LITE0, "finetune=linear_probe"],
    "scratch CNN (96 px, 5 x 32), 20 epochs": ["data.image_size=96", "train.epochs=20"],
}

# What `train.precision=auto` trades: it picks bf16 where the CPU has native bf16 (and on a GPU) for
# speed; this set asks whether the accuracy pays for it, at a fixed number of epochs.
PRECISION = {
    "bf16": ["train.precision=bf16"],
    "fp32": ["train.precision=32"],
}

# set name -> (variants, default data folder, default data.image_size or None to leave the config's)
SETS = {"recipe": (RECIPE, "imagewoof10", 64), "finetune": (FINETUNE, "flowers5", None),
        "precision": (PRECISION, "imagewoof10", 64)}


def command(data: str, size: int | None, seed: int, epochs: int, minutes: float, run_dir: Path,
            overrides: list[str]) -> list[str]:
    """run.py with the comparison's settings; a variant's own value of a key replaces the shared one."""
    shared = [*([f"data.image_size={size}"] if size else []), f"seed={seed}",
              *(["train.max_minutes=0", f"train.epochs={epochs}"] if epochs else
                [f"train.max_minutes={minutes}", "train.epochs=40"]), "wandb.mode=disabled"]
    own = {o.split("=", 1)[0] for o in overrides}
    return [sys.executable, "run.py", f"data.root={data}", *[o for o in shared if o.split("=", 1)[0] not in own],
            f"hydra.run.dir={run_dir}", *overrides]


def write(a, rows: list, machine: dict) -> list:
    """The table (mean ± std per variant, each difference from the first with its Welch interval) and
    the result file, rewritten after every run so an interrupted comparison keeps what it measured."""
    table = []
    base_accs = [r["test_accuracy"] for r in rows if r["variant"] == a.variants[0]]
    for name in a.variants:
        accs = [r["test_accuracy"] for r in rows if r["variant"] == name]
        if not accs:
            continue
        entry = {"variant": name, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 "n": len(accs), "overrides": SETS[a.set][0][name]}
        if name != a.variants[0] and len(accs) > 1 and len(base_accs) > 1:
            # the difference from the first variant with its Welch t interval; one that holds 0 is a tie
            ci = stats.ttest_ind(accs, base_accs, equal_var=False).confidence_interval(CONFIDENCE)
            entry.update(diff=entry["mean"] - statistics.mean(base_accs), diff_ci95=[float(ci.low), float(ci.high)],
                         tie=bool(ci.low <= 0 <= ci.high))
        table.append(entry)
    result = {"command": " ".join(shlex.quote(c) for c in sys.argv), "set": a.set, "data": a.data, "size": a.size,
              "minutes": None if a.epochs else a.minutes, "epochs": a.epochs or None, "seeds": a.seeds,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {**machine, "precision": sorted({str(r["precision"]) for r in rows})},
              "table": table, "runs": rows}
    Path(a.out).write_text(json.dumps(result, indent=1))
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", choices=sorted(SETS), default="recipe", help="which comparison")
    p.add_argument("--data", default=None, help="default: imagewoof10 (recipe) or flowers5 (finetune)")
    p.add_argument("--size", type=int, default=None, help="data.image_size; default 64 (recipe) or the config's")
    p.add_argument("--minutes", type=float, default=1.5)
    p.add_argument("--epochs", type=int, default=0,
                   help="train a fixed number of epochs instead of a time budget (immune to machine load)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", default=None, help="default: every variant of the set")
    p.add_argument("--out", default=str(REPO / "experiments" / "ablation" / "result.json"))
    a = p.parse_args()
    VARIANTS, folder, size = SETS[a.set]
    a.data = a.data or f"../shared/datasets/{folder}"  # relative to the repository, where run.py runs
    a.size = a.size if a.size is not None else size
    a.variants = a.variants or list(VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="inat_ablation_"))
    # Runs already in --out (same set, epochs or minutes) are kept, not repeated: a comparison stopped
    # part-way goes on where it was.
    old = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    same = (old.get("set", "recipe"), old.get("data"), old.get("size"), old.get("epochs"), old.get("minutes")) == \
        (a.set, a.data, a.size, a.epochs or None, None if a.epochs else a.minutes)
    rows = old.get("runs", []) if same else []
    machine = old.get("machine", {}) if same else {}
    machine.pop("precision", None)
    for seed in a.seeds:  # seeds outermost: machine noise spreads over all variants alike
        for name in a.variants:
            if any(r["variant"] == name and r["seed"] == seed for r in rows):
                continue
            run_dir = work / f"{abs(hash(name))}_{seed}"
            cmd = command(a.data, a.size, seed, a.epochs, a.minutes, run_dir, VARIANTS[name])
            print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
            test = json.loads((run_dir / "test" / "test.json").read_text())
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"variant": name, "seed": seed, "test_accuracy": test["accuracy"],
                         "best_val_accuracy": summary["best_val_accuracy"], "epochs": summary["epochs"],
                         "images_per_sec": summary["train_images_per_sec"], "precision": summary.get("precision"),
                         "train_seconds": summary.get("train_seconds"), "macro_f1": test.get("macro_f1"),
                         "cpu_capability": summary["environment"].get("cpu_capability"),
                         "overrides": VARIANTS[name]})
            machine = {k: summary["environment"].get(k)
                       for k in ("cpu", "cpu_count", "cpu_capability", "cpu_features", "torch")}
            print(f"  {name} seed {seed}: test {test['accuracy']:.1%}, {summary['epochs']} epochs", flush=True)
            write(a, rows, machine)
    table = write(a, rows, machine)
    base = table[0]["mean"]
    print(f"\n| variant | test accuracy (mean ± std, n={len(a.seeds)}) | vs default |\n|---|---|---|")
    for t in table:
        ci = t.get("diff_ci95")
        vs = (f"{100 * (t['mean'] - base):+.1f} pts (95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"
              f"{', a tie' if t['tie'] else ''})") if ci else ""
        print(f"| {t['variant']} | {t['mean']:.1%} ± {t['std']:.1%} | {vs} |")


if __name__ == "__main__":
    main()
