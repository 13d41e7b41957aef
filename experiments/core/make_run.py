"""The README's main command on a fresh machine, timed: ``make run DATA=...`` in a fresh clone.

    python experiments/core/make_run.py --data ../shared/datasets/flowers5 [--clone /tmp/inat_fresh]

Clones this repository (its committed HEAD) into ``--clone``, runs ``make run`` there (it
builds ``.venv`` and installs everything, then trains, tests and prints), and writes
``experiments/core/<dataset>_make_run.json`` (seconds for the whole command, the run's
summary and test numbers, the machine) plus the run's metrics.csv beside it. Run it on an
otherwise idle machine: the numbers are times.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset root with train/ and val/ or test/")
    ap.add_argument("--clone", default="/tmp/inat_make_run", help="fresh clone folder (deleted first)")
    args = ap.parse_args()
    data = Path(args.data).resolve()
    clone = Path(args.clone)
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True, capture_output=True,
                            text=True).stdout.strip()
    run_dir = "outputs/make_run"
    command = f"make run DATA={data} ARGS='hydra.run.dir={run_dir}'"
    started = time.perf_counter()
    proc = subprocess.run(command, shell=True, cwd=clone, capture_output=True, text=True)
    total = time.perf_counter() - started
    (HERE / f"{data.name}_make_run.log").write_text(proc.stdout[-4000:] + proc.stderr[-4000:])
    if proc.returncode != 0:
        sys.exit(f"make run failed with exit code {proc.returncode}; see {HERE / (data.name + '_make_run.log')}")
    run = clone / run_dir
    summary = json.loads((run / "summary.json").read_text())
    test = json.loads((run / "test" / "test.json").read_text())
    env = summary["environment"]
    record = {
        "command": f"make run DATA=../shared/datasets/{data.name}",
        "commit": commit,
        "note": "fresh clone, fresh .venv (pip installs from the local wheel cache), idle machine",
        "total_seconds_incl_venv_install": round(total, 1),
        "wall_seconds_run": summary["wall_seconds"], "train_seconds": summary["train_seconds"],
        "epochs": summary["epochs"], "planned_epochs": summary["config"]["train"]["epochs"],
        "stop_reason": summary["stop_reason"], "best_val_accuracy": summary["best_val_accuracy"],
        "train_images_per_sec": summary["train_images_per_sec"], "precision": summary.get("precision"),
        "precision_reason": summary.get("precision_reason"),
        "test_accuracy": test["accuracy"], "test_n": test["n"], "macro_f1": test.get("macro_f1"),
        "per_class_accuracy": test["per_class_accuracy"], "params": summary["params"],
        "cpu": env.get("cpu"), "cpu_capability": env.get("cpu_capability"), "torch": env.get("torch"),
        "threads": env.get("threads"),
    }
    (HERE / f"{data.name}_make_run.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.copy(run / "metrics.csv", HERE / f"{data.name}_make_run_metrics.csv")
    (HERE / f"{data.name}_make_run.log").unlink()
    print(json.dumps({k: record[k] for k in ("total_seconds_incl_venv_install", "epochs", "stop_reason",
                                             "test_accuracy", "precision", "cpu_capability")}))


if __name__ == "__main__":
    main()
