"""``resume=true``: what a run folder must hold to go on, and how the fresh setup takes it back.

A resumed run rebuilds everything from the config and today's ``train/``, then loads
``last.pt`` into it. Each check runs before the step it protects: the checkpoint and its
config before any image is decoded, the split before ``split.json`` is rewritten, so a
refused resume leaves the run folder as it found it. Under torchrun only rank 0 reads
``last.pt`` (only rank 0 writes it, so on a second node without a shared run folder it is
not there) and hands it to the others.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

from inat.checkpoint import load_checkpoint
from inat.data.split import split_changes
from inat.errors import InatError
from inat.run_folder import BEST, LAST, SUMMARY
from inat.runs import world
from inat.training import distributed
from inat.training.writer import restore_rng

if TYPE_CHECKING:
    from inat.training.data import TrainData
    from inat.training.loop import Setup

# Keys allowed to differ between the first run and its resumption.
FREE_KEYS = {"resume", "ckpt", "wandb", "mode", "explain", "report", "predict", "export", "detect", "sweep", "lr_find"}

# How split_changes' counts read in the refusal.
_CHANGE_WORDS = {"added": "added", "removed": "removed", "moved": "moved between training and validation"}


def _comparable(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in FREE_KEYS}


def load_last(run_dir: Path, cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The run folder's ``last.pt``, refused when it is missing or was written with another config.

    Under torchrun rank 0 reads and checks it, then broadcasts the checkpoint, or its refusal,
    so every rank resumes from the same state or stops with the same sentence.
    """
    if not distributed.active():
        return _read_last(run_dir, cfg_dict)
    outcome: Any = None
    if world()[0] == 0:
        try:
            outcome = _read_last(run_dir, cfg_dict)
        except InatError as err:
            outcome = err
    outcome = distributed.decide(outcome)
    if isinstance(outcome, InatError):
        raise outcome
    return outcome


def _read_last(run_dir: Path, cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    last, best = run_dir / LAST, run_dir / BEST
    if not last.is_file() and best.is_file():
        # save_epoch_checkpoints writes best.pt first: a kill between the two writes of epoch 1 leaves only best.pt.
        raise InatError(f"resume=true but run folder '{run_dir}' has {BEST} and no {LAST}: the run was stopped while "
                        f"writing its first checkpoints, before any {LAST} existed, so there is nothing to resume; "
                        f"start it again without resume=true, or use that first epoch's model as it is with "
                        f"ckpt={best}.")
    if not last.is_file():
        raise InatError(f"resume=true but run folder '{run_dir}' has no {LAST} (no epoch finished there); pass the "
                        f"folder of the run to resume with hydra.run.dir=RUN_DIR.")
    saved = load_checkpoint(last)
    if _comparable(saved["config"]) != _comparable(cfg_dict):
        raise InatError(f"resume=true with a config that differs from the one in '{last}'; resume with the same "
                        f"overrides.")
    return saved


def check_same_split(saved: Dict[str, Any], data: "TrainData", run_dir: Path) -> None:
    """Refuse to resume on a ``train/`` whose images changed since ``last.pt`` was written.

    The split is rebuilt from today's folder, so one added or removed image reshuffles its
    class and former validation images become training images, silently. Checkpoints
    without split hashes (older inat) cannot be compared and resume as before.
    """
    hashes = saved.get("split_sha1")
    if not hashes:
        return
    changes = split_changes(hashes, [data.sha1[i] for i in data.train_idx], [data.sha1[i] for i in data.val_idx])
    if any(changes.values()):
        counts = ", ".join(f"{n} {_CHANGE_WORDS[kind]}" for kind, n in changes.items() if n)
        raise InatError(f"resume=true but train/ of '{data.root}' changed since '{run_dir / LAST}' was written "
                        f"(images by content: {counts}), so the resumed run would go on with another "
                        f"train/validation split; restore the images as they were, or start a new run in another "
                        f"hydra.run.dir.")


def restore(s: "Setup", run_dir: Path, saved: Dict[str, Any]) -> None:
    """Load ``last.pt``'s weights, optimizer, EMA, scaler, loop state and RNG into the fresh setup."""
    s.model.load_state_dict(saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    if s.ema is not None and saved.get("ema_full"):
        s.ema.load_state_dict(saved["ema_full"])
    if saved.get("scaler"):
        s.scaler.load_state_dict(saved["scaler"])
    s.state.update(saved["state"])
    restore_rng(saved["rng"], s.device)
    (run_dir / SUMMARY).unlink(missing_ok=True)  # the run is unfinished again until it writes a new one
    s.writer.say(f"Resuming from epoch {s.state['epoch']} of {run_dir / LAST}")
