"""``resume=true|auto``: what a run folder must hold to go on, and how the fresh setup takes it back.

``resume=true`` needs ``last.pt``. ``resume=auto`` (a preemptible job's rerun: the same command
every time) resumes when the folder has ``last.pt``, starts fresh when it holds no run yet (only
what a run writes before its first checkpoint, :data:`BEFORE_FIRST_CHECKPOINT`), and refuses any
other folder: a finished run, ``best.pt`` without ``last.pt``, a file inat does not write.

A resumed run rebuilds everything from the config and today's ``train/``, then loads
``last.pt`` into it. Each check runs before the step it protects: the checkpoint and its
config before any image is decoded, the split before ``split.json`` is rewritten, so a
refused resume leaves the run folder as it found it. Under torchrun only rank 0 reads
``last.pt`` (only rank 0 writes it, so on a second node without a shared run folder it is
not there) and hands it to the others.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from inat.checkpoint import load_checkpoint
from inat.data.split import split_changes
from inat.errors import InatError
from inat.run_folder import BEST, CHECKPOINTS, HYDRA_CONFIG, LAST, SPLIT, SUMMARY, read_summary
from inat.runs import LOCK_NAME, TEMP_GLOB, world
from inat.training import distributed
from inat.training.writer import restore_rng

if TYPE_CHECKING:
    from inat.training.data import TrainData
    from inat.training.build import Setup

# The config's sections (and top-level keys) that change what training computes: a resumed run must
# have the same values in each. Everything else (resume itself, ckpt, wandb, the other commands'
# sections: mode, predict, export, ...) may differ, so a new command's section never blocks a resume.
TRAINING_SECTIONS = ("data", "model", "act", "filters", "aug", "finetune", "optim", "train", "seed")

# What a run folder holds before the first checkpoint, as patterns of top-level names: Hydra's
# record (.hydra/) and job log (<job name>.log), the split, the run lock, wandb's folder, and
# temp files of atomic writes a kill interrupted (runs.temp_path: .<name>.<pid>.<id>.tmp).
# checkpoints/ counts as empty when it holds only such temp files.
BEFORE_FIRST_CHECKPOINT = (str(Path(HYDRA_CONFIG).parent), "*.log", SPLIT, LOCK_NAME, "wandb", TEMP_GLOB)

# How split_changes' counts read in the refusal.
_CHANGE_WORDS = {"added": "added", "removed": "removed", "moved": "moved between training and validation"}


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: config.get(k) for k in TRAINING_SECTIONS}


def _word(resume: Any) -> str:
    return "auto" if resume == "auto" else "true"


def load_last(run_dir: Path, config: Dict[str, Any], resume: Any = True) -> Optional[Dict[str, Any]]:
    """The run folder's ``last.pt`` to resume from, or None to train from the start.

    ``resume`` is the config's value: false (None), true (``last.pt`` must be there) or
    ``"auto"`` (see the module's docstring). A missing ``last.pt`` under true, a folder auto
    will not start in, or a checkpoint written with another config is refused with one
    sentence. Under torchrun rank 0 looks at the folder and reads the checkpoint, then
    broadcasts it, or None, or its refusal, so every rank does the same.
    """
    if resume is False or resume is None:
        return None
    if not distributed.active():
        return _read_last(run_dir, config, resume)
    outcome: Any = None
    if world()[0] == 0:
        try:
            outcome = _read_last(run_dir, config, resume)
        except InatError as err:
            outcome = err
    outcome = distributed.decide(outcome)
    if isinstance(outcome, InatError):
        raise outcome
    return outcome


def _read_last(run_dir: Path, config: Dict[str, Any], resume: Any) -> Optional[Dict[str, Any]]:
    last, best, word = run_dir / LAST, run_dir / BEST, _word(resume)
    if word == "auto":
        problem = auto_problem(run_dir)
        if problem:
            raise InatError(problem)
        if not last.is_file():
            return None
    if not last.is_file() and best.is_file():
        # save_epoch_checkpoints writes best.pt first: a kill between the two writes of epoch 1 leaves only best.pt.
        raise InatError(_best_only(run_dir, word))
    if not last.is_file():
        raise InatError(f"resume=true but run folder '{run_dir}' has no {LAST} (no epoch finished there); pass the "
                        f"folder of the run to resume with hydra.run.dir=RUN_DIR.")
    saved = load_checkpoint(last)
    if _comparable(saved["config"]) != _comparable(config):
        raise InatError(f"resume={word} with a config that differs from the one in '{last}'; resume with the same "
                        f"overrides.")
    partial = saved.get("state", {}).get("partial")
    if partial is not None and len(partial["ranks"]) != world()[1]:
        # Each rank's share of the epoch depends on the number of ranks: the rest of it cannot be told apart.
        raise InatError(f"resume={word} but '{last}' was written inside an epoch by {len(partial['ranks'])} "
                        f"process(es) and this run has {world()[1]}; resume it with the same number of processes "
                        f"(torchrun --nproc_per_node), since each one's share of the stopped epoch depends on it.")
    return saved


def _best_only(run_dir: Path, word: str) -> str:
    return (f"resume={word} but run folder '{run_dir}' has {BEST} and no {LAST}: the run was stopped while "
            f"writing its first checkpoints, before any {LAST} existed, so there is nothing to resume; "
            f"start it again without resume={word} (or in another hydra.run.dir), or use that first epoch's model "
            f"as it is with ckpt={run_dir / BEST}.")


def _unexpected(run_dir: Path) -> List[str]:
    """Names in ``run_dir`` a run does not write before its first checkpoint (relative, sorted)."""
    out: List[str] = []
    for path in sorted(run_dir.iterdir()):
        if path.name == CHECKPOINTS and path.is_dir():
            out += [f"{CHECKPOINTS}/{p.name}" for p in sorted(path.iterdir()) if not fnmatch.fnmatch(p.name, TEMP_GLOB)]
        elif not any(fnmatch.fnmatch(path.name, pattern) for pattern in BEFORE_FIRST_CHECKPOINT):
            out.append(path.name + ("/" if path.is_dir() else ""))
    return out


def auto_problem(run_dir: Path) -> Optional[str]:
    """Why ``resume=auto`` neither resumes nor starts in ``run_dir`` (one sentence), or None.

    None for a folder with ``last.pt`` and no ``summary.json`` (resume) and for one that holds
    nothing but what a run writes before its first checkpoint (start fresh); a folder that
    does not exist yet is the second kind.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    if (run_dir / SUMMARY).is_file():
        summary = read_summary(run_dir)
        reason = f", stop reason '{summary.stop_reason}'" if summary is not None else ""
        return (f"resume=auto but run folder '{run_dir}' holds a finished run ({SUMMARY}{reason}), so there is "
                f"nothing to resume; choose another hydra.run.dir for a new run, or test this one with +mode=test "
                f"ckpt={run_dir / BEST}.")
    if (run_dir / LAST).is_file():
        return None
    if (run_dir / BEST).is_file():
        return _best_only(run_dir, "auto")
    unexpected = _unexpected(run_dir)
    if unexpected:
        shown = ", ".join(f"'{name}'" for name in unexpected[:3]) + (f" and {len(unexpected) - 3} more"
                                                                      if len(unexpected) > 3 else "")
        return (f"resume=auto but run folder '{run_dir}' has no {LAST} and holds {shown}, which a run does not write "
                f"before its first checkpoint, so it is neither a run to resume nor an unstarted one; choose another "
                f"hydra.run.dir, or move those files away to start a run there.")
    return None


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


def restore(s: "Setup", run_dir: Path, saved: Dict[str, Any], resume: Any) -> None:
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
    partial = s.state.get("partial")
    inside = (f", {partial['batches']} of {partial['of']} batches into epoch {partial['epoch'] + 1}"
              if partial is not None else "")
    s.writer.say(f"Resuming from epoch {s.state['epoch']}{inside} of {run_dir / LAST} "
                 f"(resume={_word(resume)})")
