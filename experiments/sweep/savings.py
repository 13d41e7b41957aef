"""What the sweep strategies saved, computed from a finished sweep folder (no numbers typed in).

    python experiments/sweep/savings.py experiments/sweep/woof [--startup 8]

Writes SWEEP_DIR/savings.json and prints a short markdown summary. Measured: epochs and
training seconds the median rule did not spend (seconds estimated from each pruned trial's
own per-epoch time), trials the budget refused, and how the TPE phase compares with the
seeded random start-up phase of the same study. Not measured: a separate random-search run
(no CPU time for it), so the TPE comparison is within one sweep.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from inat.sweep.analysis import load_sweep


def savings(sweep_dir: Path, startup: int) -> dict:
    data = load_sweep(sweep_dir)
    trained = sorted(data.trained, key=lambda r: r.number)
    planned = data.epochs_planned or 0
    pruned = [r for r in trained if r.state == "pruned"]
    epochs_run = sum(r.epochs for r in trained)
    epochs_saved = sum(planned - r.epochs for r in pruned)
    # A pruned trial would have gone on at its own measured pace, up to train.max_minutes.
    def cap(r) -> float:
        cfg = json.loads((Path(r.path) / "summary.json").read_text()).get("config", {})
        minutes = float(cfg.get("train", {}).get("max_minutes") or 0)
        return minutes * 60 if minutes > 0 else float("inf")

    seconds_saved = sum(min(planned * r.train_seconds / max(1, r.epochs), cap(r)) - r.train_seconds for r in pruned)
    seconds_run = sum(r.train_seconds for r in trained)
    complete = [r for r in trained if r.state == "complete"]
    full_trial_seconds = statistics.median(r.train_seconds for r in complete) if complete else 0.0
    random_phase = [r for r in trained if r.number < startup]
    tpe_phase = [r for r in trained if r.number >= startup]
    best = max(trained, key=lambda r: r.val_accuracy)
    bar = statistics.median(r.val_accuracy for r in random_phase) if random_phase else None
    # Plain random search reaching the best: if only one of n random draws reaches it, expect ~n draws.
    random_hits = [r for r in random_phase if r.val_accuracy >= best.val_accuracy]
    return {
        "trials_trained": len(trained), "trials_pruned": len(pruned), "epochs_planned_per_trial": planned,
        "epochs_run": epochs_run, "epochs_saved_by_pruning": epochs_saved,
        "train_seconds_run": round(seconds_run), "train_seconds_saved_by_pruning_est": round(seconds_saved),
        "full_trial_train_seconds_median": round(full_trial_seconds),
        "full_trials_saved_by_pruning_est": round(seconds_saved / full_trial_seconds, 1) if full_trial_seconds else None,
        "trials_refused_by_budget": sum(r.state == "budget" for r in data.rows),
        "best": {"trial": best.number, "val_accuracy": best.val_accuracy, "phase": "random" if best.number < startup else "tpe"},
        "random_phase": {"trials": len(random_phase), "median": bar, "max": max((r.val_accuracy for r in random_phase), default=None),
                         "reached_best": len(random_hits)},
        "tpe_phase": {"trials": len(tpe_phase),
                      "median": statistics.median(r.val_accuracy for r in tpe_phase) if tpe_phase else None,
                      "share_above_random_median": (sum(r.val_accuracy > bar for r in tpe_phase) / len(tpe_phase))
                      if tpe_phase and bar is not None else None},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--startup", type=int, default=8, help="TPE n_startup_trials (seeded random phase)")
    ns = parser.parse_args()
    s = savings(ns.sweep_dir, ns.startup)
    (ns.sweep_dir / "savings.json").write_text(json.dumps(s, indent=1))
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"- trials trained: {s['trials_trained']} ({s['trials_pruned']} pruned); budget refused {s['trials_refused_by_budget']}")
    print(f"- pruning: {s['epochs_saved_by_pruning']} of {s['epochs_run'] + s['epochs_saved_by_pruning']} epochs not trained; "
          f"~{s['train_seconds_saved_by_pruning_est']} s of {s['train_seconds_run'] + s['train_seconds_saved_by_pruning_est']} s "
          f"= ~{s['full_trials_saved_by_pruning_est']} full-cost trials (median full trial {s['full_trial_train_seconds_median']} s)")
    print(f"- best {pct(s['best']['val_accuracy'])} (trial {s['best']['trial']}, {s['best']['phase']} phase)")
    print(f"- random phase: {s['random_phase']['trials']} trials, median {pct(s['random_phase']['median'])}, "
          f"max {pct(s['random_phase']['max'])}; TPE phase: {s['tpe_phase']['trials']} trials, median "
          f"{pct(s['tpe_phase']['median'])}, {pct(s['tpe_phase']['share_above_random_median'])} above the random median")


if __name__ == "__main__":
    main()
