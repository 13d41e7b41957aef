"""Checkpoint files: the model weights travel with the fully resolved config.

A checkpoint is a dict with ``format == FORMAT``. ``load_checkpoint`` unpickles with
``weights_only=True`` (tensors, containers and plain scalars only), so a crafted ``.pt``
cannot run code, then checks the marker before anything else, then the fields every mode
needs; anything else is refused with one sentence, so ``+mode=test ckpt=PATH`` can rebuild
the model with no other flags.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from inat.calibration import TEMPERATURE_KEY, temperature_problem
from inat.errors import InatError
from inat.run_folder import BEST, CHECKPOINTS, LAST
from inat.runs import atomic_path

FORMAT = "inat-checkpoint-v1"
# What every consumer reads (test, predict, export, explain, detect.classify) and its type.
REQUIRED = {"config": dict, "classes": list, "model": dict}


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write atomically (temp file + rename) so a crash or a full disk never leaves a torn checkpoint."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def save_epoch_checkpoints(state: Dict[str, Any], ckpt_dir: Path, improved: bool) -> None:
    """Save an epoch's ``best.pt`` (when it improved) *before* ``last.pt``.

    Resume starts from ``last.pt``; if a kill came between the two writes with ``last.pt``
    first, the resumed run would have moved past the best epoch without ever saving it.
    In this order a kill leaves either both or the previous ``last.pt``, which resumes the
    epoch and writes ``best.pt`` again.
    """
    ckpt_dir = Path(ckpt_dir)
    if improved:
        save_checkpoint(state, ckpt_dir / Path(BEST).name)
    save_checkpoint(state, ckpt_dir / Path(LAST).name)


def _safe_globals() -> list:
    """Non-tensor types our own checkpoints may hold: numpy scalars from metrics (data, never code)."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    return [multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")}]


def _check_fields(state: Dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint with the marker but without what a model is rebuilt from."""
    for key, kind in REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise InatError(f"Checkpoint '{path}' is incomplete: its '{key}' field is missing or not a {kind.__name__}; "
                            f"pass a checkpoints/best.pt or last.pt written by an inat run.")
    if not state["classes"] or not all(isinstance(c, str) for c in state["classes"]):
        raise InatError(f"Checkpoint '{path}' has no valid class list (expected the class names of its train/ folder).")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise InatError(f"Checkpoint '{path}' has model weights that are not tensors; it is not a complete inat checkpoint.")
    for key in ("data", "model"):
        if not isinstance(state["config"].get(key), dict):
            raise InatError(f"Checkpoint '{path}' has no '{key}' section in its config; it is not a complete inat checkpoint.")
    # Every consumer divides logits by it: T = 0 gave NaN probabilities and T < 0 a reversed ranking.
    problem = temperature_problem(state.get(TEMPERATURE_KEY))
    if problem:
        raise InatError(f"Checkpoint '{path}' has {problem}: dividing the logits by it gives meaningless "
                        f"probabilities; use a checkpoint written by an inat run.")


def _folder_hint(path: Path) -> str:
    """The sentence for ``ckpt=`` a folder: the checkpoint inside it when there is one.

    The folder may be a run folder or its checkpoints/ folder itself; the hint used to append
    checkpoints/best.pt to either, naming checkpoints/checkpoints/best.pt for the second.
    """
    inner = path if path.name == CHECKPOINTS else path / CHECKPOINTS
    names = [Path(BEST).name, Path(LAST).name]
    for candidate in dict.fromkeys([path / n for n in names] + [inner / n for n in names]):
        if candidate.is_file():
            return f"Checkpoint '{path}' is a directory; pass the file inside it: ckpt={candidate}."
    where = "it" if inner == path else f"it or {inner}"
    return (f"Checkpoint '{path}' is a directory with no {names[0]} or {names[1]} in {where}; pass a checkpoint "
            f"file, e.g. ckpt={inner / names[0]} of a run that has finished an epoch.")


def load_checkpoint(path: str | os.PathLike | None) -> Dict[str, Any]:
    """Load an inat checkpoint on the CPU; missing, unreadable, foreign or tampered files are refused."""
    if path is None or str(path) == "":
        raise InatError("This mode needs a checkpoint: add ckpt=PATH (e.g. ckpt=outputs/train/<run>/checkpoints/best.pt).")
    path = Path(path)
    if path.is_dir():
        raise InatError(_folder_hint(path))
    if not path.exists():
        raise InatError(f"Checkpoint '{path}' does not exist.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global outside the allowlist: the file wants to build objects
        # (or run code), which an inat checkpoint never does.
        raise InatError(f"Checkpoint '{path}' was refused: it holds Python objects other than tensors and plain data, "
                        f"which an inat checkpoint never does (it was not loaded).") from err
    except Exception as err:  # zip, EOF and torch errors all mean the same thing here
        raise InatError(f"Checkpoint '{path}' could not be read ({type(err).__name__}); is it a complete inat checkpoint?") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InatError(f"'{path}' is not an inat checkpoint (no '{FORMAT}' marker); pass a checkpoints/best.pt or last.pt of an inat run.")
    _check_fields(state, path)
    return state
