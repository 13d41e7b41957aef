"""What the sweep strategies saved, computed from a finished sweep folder (no numbers typed in).

    python experiments/sweep/savings.py experiments/sweep/woof [--startup 8]

Writes SWEEP_DIR/savings.json and prints a short markdown summary. Measured: epochs and
training seconds the median rule did not spend (seconds estimated from each pruned trial's
own per-epoch time), trials the budget refused, and how the TPE phase compares with the
seeded random start-up phase of the same study. With ``--random RANDOM_SWEEP_DIR`` (a plain
random-search sweep of the same space and settings, no pruning: experiments/sweep/run_random.sh)
it also counts the full-cost trials each sweep spent before first reaching the same accuracy.

    python experiments/sweep/savings.py experiments/sweep/woof --random experiments/sweep/woof_random
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
        return r.max_minutes * 60 if r.max_minutes > 0 else float("inf")

    seconds_saved = sum(min(planned * r.train_seconds / max(1, r.epochs), cap(r)) - r.train_seconds for r in pruned)
    seconds_run = sum(r.train_seconds for r in trained)
    complete = [r for r in trained if r.state == "complete"]
    full_trial_seconds = statistics.median(r.train_seconds for r in complete) if complete else 0.0
    random_phase = [r for r in trained if r.number < startup]
    tpe_phase = [r for r in trained if r.number >= startup]
    best = max(trained, key=lambda r: r.val_accuracy)
    bar = statistics.median(r.val_accuracy for r in random_phase) if random_phase else None
    # Plain random search reaching the best: if only one of n random draws reaches it, expect ~n draws.
    random_hits = [r for r in random_phase if reaches(r.val_accuracy, best.val_accuracy)]
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


def reaches(accuracy: float, level: float) -> bool:
    """``accuracy >= level`` on what they mean, not on their float bits.

    Accuracies are counts over the validation set (84/240 = 0.35) stored as float32
    (0.3499999940...), while levels are float64 (0.35): compared raw, a trial at exactly a
    level fails it. Any two distinct k/n with n below 10^5 differ by more than 1e-5, so
    rounding both to 6 decimals compares the counts exactly.
    """
    return round(float(accuracy), 6) >= round(float(level), 6)


def trial_cost(r, planned: int) -> float:
    """A trial's cost in full-cost trials: a pruned one paid for the epochs it trained."""
    return min(1.0, r.epochs / planned) if r.state == "pruned" and planned else 1.0


def cost_to_reach(rows, level: float, planned: int):
    """(full-cost trials spent, trials started) until the first trial at or above ``level``; None if never."""
    spent = 0.0
    for i, r in enumerate(sorted(rows, key=lambda r: r.number)):
        spent += trial_cost(r, planned)
        if reaches(r.val_accuracy, level):
            return round(spent, 1), i + 1
    return None


def versus_random(sweep_dir: Path, random_dir: Path) -> dict:
    """Full-cost trials the strategies (TPE + pruning) and plain random search spent to reach the same accuracy."""
    ours, rand = load_sweep(sweep_dir), load_sweep(random_dir)
    planned = ours.epochs_planned or 0
    mine, theirs = ours.trained, rand.trained
    best_ours, best_rand = max(r.val_accuracy for r in mine), max(r.val_accuracy for r in theirs)
    common = min(best_ours, best_rand)
    # Levels: every 2.5 points up to the best accuracy both sweeps reached, then that accuracy itself.
    levels = sorted({round(x / 1000, 4) for x in range(200, int(round(common, 6) * 1000) + 1, 25)} | {round(common, 6)})
    table = []
    for level in levels:
        a, b = cost_to_reach(mine, level, planned), cost_to_reach(theirs, level, planned)
        # Random trials are independent draws, so 1 / (share at or above the level) is the expected
        # number of full-cost trials plain random search needs: steadier than its one first hit.
        hits = sum(reaches(r.val_accuracy, level) for r in theirs)
        table.append({"val_accuracy": level, "strategies_full_cost_trials": a and a[0], "strategies_trials": a and a[1],
                      "random_full_cost_trials": b and b[0], "random_trials": b and b[1],
                      "saved_full_cost_trials": round(b[0] - a[0], 1) if a and b else None,
                      "random_hits": hits, "random_expected_full_cost_trials": round(len(theirs) / hits, 1) if hits else None,
                      "strategies_hits": sum(reaches(r.val_accuracy, level) for r in mine),
                      "saved_vs_expected": round(len(theirs) / hits - a[0], 1) if a and hits else None})
    return {
        "strategies": {"dir": str(sweep_dir), "trials": len(mine), "best": best_ours,
                       "full_cost_trials": round(sum(trial_cost(r, planned) for r in mine), 1),
                       "train_seconds": round(sum(r.train_seconds for r in mine))},
        "random": {"dir": str(random_dir), "trials": len(theirs), "best": best_rand,
                   "full_cost_trials": round(sum(trial_cost(r, planned) for r in theirs), 1),
                   "train_seconds": round(sum(r.train_seconds for r in theirs)),
                   "refused_by_budget": sum(r.state == "budget" for r in rand.rows)},
        "common_best": common, "levels": table,
        "random_reaches_strategies_best": cost_to_reach(theirs, best_ours, planned),
        "strategies_reach_random_best": cost_to_reach(mine, best_rand, planned),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--startup", type=int, default=8, help="TPE n_startup_trials (seeded random phase)")
    parser.add_argument("--random", type=Path, help="a plain random-search sweep folder to compare with")
    ns = parser.parse_args()
    s = savings(ns.sweep_dir, ns.startup)
    if ns.random:
        s["versus_random"] = versus_random(ns.sweep_dir, ns.random)
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
    v = s.get("versus_random")
    if v:
        print(f"- vs plain random search ({v['random']['trials']} full-cost trials, best {pct(v['random']['best'])}; "
              f"strategies: {v['strategies']['trials']} trials = {v['strategies']['full_cost_trials']} full-cost, "
              f"best {pct(v['strategies']['best'])}):")
        print("\n| val accuracy reached | strategies: full-cost trials (trials) to first reach it | random: first reached after "
              "| saved | random: expected trials (hits) | saved vs expected | strategies: trials at or above |")
        print("|---|---|---|---|---|---|---|")
        for row in v["levels"]:
            a = "never" if row["strategies_full_cost_trials"] is None else \
                f"{row['strategies_full_cost_trials']} ({row['strategies_trials']})"
            b = "never" if row["random_full_cost_trials"] is None else f"{row['random_full_cost_trials']}"
            saved = "" if row["saved_full_cost_trials"] is None else f"{row['saved_full_cost_trials']}"
            expected = "never" if row["random_expected_full_cost_trials"] is None else \
                f"{row['random_expected_full_cost_trials']} ({row['random_hits']})"
            vs = "" if row["saved_vs_expected"] is None else f"{row['saved_vs_expected']}"
            print(f"| {pct(row['val_accuracy'])} | {a} | {b} | {saved} | {expected} | {vs} | {row['strategies_hits']} |")


if __name__ == "__main__":
    main()
