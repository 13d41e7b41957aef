"""A sweep trial as the pruning rule, the sweeper and the sweep analysis see it.

The files are read by :mod:`inat.run_folder` (numbered trial folders, or the compact
``trials.csv`` that stands in for them once raw folders are gone); ``Trial`` adds the few
per-trial questions the sweep code asks, so it also works for sweeps whose Optuna storage
is gone or unreachable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from inat import run_folder
from inat.run_folder import MetricsRow, RunRecord, Summary


@dataclass
class Trial:
    """One trial: its number and run record (overrides, per-epoch curve, summary once finished)."""

    number: int
    record: RunRecord

    @property
    def path(self) -> Path:
        return self.record.path

    @property
    def summary(self) -> Optional[Summary]:
        return self.record.summary

    @property
    def curve(self) -> List[MetricsRow]:
        return self.record.metrics

    @property
    def overrides(self) -> Dict[str, str]:
        return run_folder.overrides_dict(self.record.overrides)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def stop_reason(self) -> str:
        return self.summary.stop_reason if self.summary is not None else "running"

    @property
    def pruned(self) -> bool:
        return self.summary is not None and self.summary.pruned

    @property
    def budget_stopped(self) -> bool:
        return self.summary is not None and self.summary.budget_stopped

    @property
    def best_val_accuracy(self) -> Optional[float]:
        if self.summary is not None and self.summary.best_val_accuracy is not None:
            return float(self.summary.best_val_accuracy)
        return max((row.val_accuracy for row in self.curve), default=None)

    @property
    def epochs(self) -> int:
        return len(self.curve)

    def val_accuracy_at(self, epoch: int) -> Optional[float]:
        """Validation accuracy after ``epoch`` (1-based), None if the trial never got there."""
        for row in self.curve:
            if row.epoch == epoch:
                return row.val_accuracy
        return None

    def best_val_loss(self) -> Optional[float]:
        """Validation loss at the best-accuracy epoch (the checkpoint a user would keep)."""
        if not self.curve:
            return None
        return max(self.curve, key=lambda r: r.val_accuracy).val_loss


def read_trial(trial_dir: Path) -> Trial:
    """One trial folder; a missing or half-written summary means the trial is still running."""
    return Trial(int(Path(trial_dir).name), run_folder.read_run(trial_dir, strict=False))


def read_trials(sweep_dir: Path) -> List[Trial]:
    """Every trial of a sweep (folders, else trials.csv), in trial-number order."""
    return [Trial(n, r) for n, r in run_folder.read_sweep(sweep_dir).trials.items()]
