"""Read a sweep (Hydra multirun) folder: one ``Trial`` per numbered trial folder.

A trial folder is a normal run folder (``.hydra/``, ``metrics.csv``, ``summary.json`` once
finished). Everything the report, the pruning rule and the proxy promotion need comes from
these files, so they also work for sweeps whose Optuna storage is gone or unreachable.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


@dataclass
class Trial:
    """One trial folder: its overrides, per-epoch curve and (when finished) summary."""

    number: int
    path: Path
    overrides: Dict[str, str] = field(default_factory=dict)
    curve: List[Dict[str, float]] = field(default_factory=list)
    summary: Optional[Dict[str, Any]] = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def stop_reason(self) -> str:
        return str((self.summary or {}).get("stop_reason", "running"))

    @property
    def pruned(self) -> bool:
        return self.stop_reason.startswith("pruned")

    @property
    def budget_stopped(self) -> bool:
        return self.stop_reason.startswith("budget:")  # train.py's own per-run "budget" has no colon

    @property
    def best_val_accuracy(self) -> Optional[float]:
        if self.summary and self.summary.get("best_val_accuracy") is not None:
            return float(self.summary["best_val_accuracy"])
        return max((row["val_accuracy"] for row in self.curve), default=None)

    @property
    def epochs(self) -> int:
        return len(self.curve)

    def val_accuracy_at(self, epoch: int) -> Optional[float]:
        """Validation accuracy after ``epoch`` (1-based), None if the trial never got there."""
        for row in self.curve:
            if int(row["epoch"]) == epoch:
                return float(row["val_accuracy"])
        return None

    def best_val_loss(self) -> Optional[float]:
        """Validation loss at the best-accuracy epoch (the checkpoint a user would keep)."""
        if not self.curve:
            return None
        return float(max(self.curve, key=lambda r: r["val_accuracy"])["val_loss"])


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """``metrics.csv`` as a list of float dicts ([] when the file is missing or half-written)."""
    try:
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]
    except (OSError, ValueError):
        return []


def read_overrides(trial_dir: Path) -> Dict[str, str]:
    """The trial's command-line overrides (``.hydra/overrides.yaml``) as ``{key: value}``."""
    import yaml

    path = trial_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out: Dict[str, str] = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_trial(trial_dir: Path) -> Trial:
    """One trial folder; a missing or half-written summary means the trial is still running."""
    summary = None
    try:
        summary = json.loads((trial_dir / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    return Trial(int(trial_dir.name), trial_dir, read_overrides(trial_dir), read_metrics(trial_dir / "metrics.csv"),
                 summary)


def read_sweep(sweep_dir: Path) -> List[Trial]:
    """Every numbered trial folder of a sweep, in trial-number order."""
    sweep_dir = Path(sweep_dir)
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()] if sweep_dir.is_dir() else []
    return sorted((read_trial(p) for p in dirs), key=lambda t: t.number)
