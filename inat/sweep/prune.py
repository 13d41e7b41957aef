"""Median stopping rule for sweep trials, called by ``inat.training.fit`` after every epoch.

A trial is stopped after epoch e (e > ``sweep.prune_warmup_epochs``) when its validation
accuracy at e is below the median of the finished trials' validation accuracy at e, once at
least ``sweep.prune_min_trials`` finished trials reached e (Golovin et al. 2017, "Google
Vizier", median stopping). The evidence is read from the sibling trial folders, so workers
on many machines share it through a common sweep folder with no extra service.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, Optional

from inat.sweep.trials import read_trials


def should_stop(cfg: Any, run_dir: Path, record: Dict[str, Any]) -> Optional[str]:
    """The reason to stop this trial now, or None to continue.

    ``run_dir`` is the trial folder; its parent is the sweep folder. ``record`` is the epoch's
    metrics row (epoch, val_accuracy, ...). The last epoch is never pruned: stopping there saves
    nothing and would only hide a finished trial's result.
    """
    sweep_cfg = cfg.sweep
    epoch = int(record["epoch"])
    if not sweep_cfg.prune or epoch <= int(sweep_cfg.prune_warmup_epochs) or epoch >= int(cfg.train.epochs):
        return None
    run_dir = Path(run_dir)
    others = [t.val_accuracy_at(epoch) for t in read_trials(run_dir.parent)
              if t.finished and t.path.resolve() != run_dir.resolve()]
    others = [v for v in others if v is not None]
    if len(others) < max(1, int(sweep_cfg.prune_min_trials)):
        return None
    median = statistics.median(others)
    accuracy = float(record["val_accuracy"])
    if accuracy < median:
        return (f"val accuracy {accuracy:.1%} at epoch {epoch} is below the median {median:.1%} "
                f"of {len(others)} finished trials")
    return None
