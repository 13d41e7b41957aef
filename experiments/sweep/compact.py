"""Turn a finished sweep's raw output into the small evidence files that are committed.

    python experiments/sweep/compact.py experiments/sweep/woof experiments/sweep/woof_random \
        experiments/sweep/woof_promoted --random experiments/sweep/woof_random

Run it on the machine that ran the sweeps, while the raw trial folders and ``optuna.db`` are
still there. Per sweep folder it writes ``trials.csv`` (one row per trial: start time from the
study, stop reason, epochs, best val accuracy, overrides, the val curves), regenerates
``sweep_report.json`` and the figures from the raw folders, and, for the first folder with
``--random``, ``savings.json``. Machine paths (data roots, interpreters, the checkout) are
replaced by repository-relative names or a placeholder. It then reads ``trials.csv`` alone
(raw folders hidden) and fails unless the savings computed from it equal the ones from the
raw folders: what is committed reproduces the numbers. The raw folders and ``.db`` files stay
on disk, ignored by git (``experiments/sweep/.gitignore``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

from inat import run_folder
from inat.sweep.analysis import load_sweep
from inat.sweep.report import build_report

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Absolute paths a sweep records, and what the committed copy says instead.
MACHINE_PATHS = [
    (re.compile(r"sqlite:////[^\s\"',]*?/(experiments/sweep/)"), r"sqlite:///\1"),  # relative to the checkout
    (re.compile(r"(?<![:/\w])/[^\s\"',:]*?/(\.venv/bin/python)"), r"\1"),
    (re.compile(r"(?<![:/\w])/[^\s\"',:]*?/(experiments/sweep/)"), r"\1"),
    (re.compile(r"(?<![:/\w])/[^\s\"',:]*?/(run\.py)"), r"\1"),
    # run_sweep.sh's class-balanced subset of imagewoof10 (symlinks; `run_sweep.sh --subset-only`)
    (re.compile(r"/tmp/inat_woof\d+"), "<woof_subset>"),
]
TEXT_FILES = (run_folder.SWEEP_INFO, run_folder.SWEEP_REPORT, run_folder.PROMOTION, run_folder.SAVINGS,
              run_folder.TRIALS_CSV, run_folder.OPTIMIZATION_RESULTS)


def scrub(text: str) -> str:
    """``text`` with every machine path replaced (see MACHINE_PATHS)."""
    for pattern, repl in MACHINE_PATHS:
        text = pattern.sub(repl, text)
    return text


def scrub_folder(sweep_dir: Path) -> None:
    """Rewrite the sweep's small text files without machine paths."""
    for name in TEXT_FILES:
        path = sweep_dir / name
        if path.is_file():
            path.write_text(scrub(path.read_text()))


def savings_module() -> Any:
    spec = importlib.util.spec_from_file_location("savings", HERE / "savings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_trials(sweep_dir: Path) -> int:
    """``trials.csv`` from the raw folders, start times from the study; returns the row count."""
    data = load_sweep(sweep_dir)
    started = {r.number: r.started for r in data.rows}
    record = run_folder.read_sweep(sweep_dir)
    if record.compact:
        raise SystemExit(f"{sweep_dir}: no raw trial folders left to compact (trials.csv is all there is).")
    rows = [run_folder.trial_row(n, r, started.get(n)) for n, r in record.trials.items()]
    run_folder.write_trials_csv(sweep_dir, rows)
    return len(rows)


def compact_copy(sweep_dir: Path, into: Path) -> Path:
    """A copy of the sweep folder holding only what is committed (no trial folders, no study)."""
    target = into / sweep_dir.name
    target.mkdir(parents=True)
    for name in TEXT_FILES:
        if (sweep_dir / name).is_file():
            shutil.copy(sweep_dir / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--random", type=Path, help="random-search sweep the first sweep's savings compare with")
    parser.add_argument("--startup", type=int, default=8)
    ns = parser.parse_args()
    for sweep_dir in ns.sweeps:
        scrub_folder(sweep_dir)  # sweep.json first: its storage URL must point into this checkout
        build_report(sweep_dir)
        n = write_trials(sweep_dir)
        scrub_folder(sweep_dir)
        print(f"{sweep_dir}: {n} trials -> {run_folder.TRIALS_CSV}, {run_folder.SWEEP_REPORT}, figures")
    if ns.random:
        savings = savings_module()
        ours = ns.sweeps[0]
        result: Dict[str, Any] = savings.savings(ours, ns.startup)
        result["versus_random"] = savings.versus_random(ours, ns.random)
        (ours / run_folder.SAVINGS).write_text(scrub(json.dumps(result, indent=1)))
        with tempfile.TemporaryDirectory() as tmp:  # the committed files alone must give the same numbers
            a, b = compact_copy(ours, Path(tmp)), compact_copy(ns.random, Path(tmp))
            again = savings.savings(a, ns.startup)
            again["versus_random"] = savings.versus_random(a, b)
        for key in ("dir",):
            for side in ("strategies", "random"):
                again["versus_random"][side][key] = result["versus_random"][side][key]
        if again != result:
            raise SystemExit("savings from trials.csv differ from savings from the raw folders")
        print(f"{ours / run_folder.SAVINGS}: reproduced from {run_folder.TRIALS_CSV} alone")


if __name__ == "__main__":
    main()
