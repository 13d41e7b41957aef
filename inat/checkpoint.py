"""Checkpoint files: the model weights travel with the fully resolved config.

A checkpoint is a dict with ``format == FORMAT``; ``load_checkpoint`` refuses anything else
with one sentence, so ``+mode=test ckpt=PATH`` can rebuild the model with no other flags.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from inat.errors import InatError
from inat.runs import temp_path

FORMAT = "inat-checkpoint-v1"


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike | None) -> Dict[str, Any]:
    """Load an inat checkpoint on the CPU; missing, unreadable or foreign files are refused."""
    if path is None or str(path) == "":
        raise InatError("This mode needs a checkpoint: add ckpt=PATH (e.g. ckpt=outputs/train/<run>/checkpoints/best.pt).")
    path = Path(path)
    if not path.is_file():
        raise InatError(f"Checkpoint '{path}' does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and torch errors all mean the same thing here
        raise InatError(f"Checkpoint '{path}' could not be read ({type(err).__name__}); is it a complete inat checkpoint?") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InatError(f"'{path}' is not an inat checkpoint (no '{FORMAT}' marker); pass a checkpoints/best.pt or last.pt of an inat run.")
    return state
