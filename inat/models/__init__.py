"""Models: the registry, the scratch CNN, pretrained backbones and freezing strategies.

Importing this package registers every built-in model: the registry (``registry.py``) is a
leaf that imports no model, and the model modules are imported here, as timm's
``models/__init__.py`` does, so ``list_models()`` is complete whichever module a caller
imports first. The model modules keep their heavy dependencies (torchvision, timm) inside
the builders, so this import stays light.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

from omegaconf import OmegaConf

from inat.checkpoint import load_checkpoint
from inat.errors import InatError
from inat.models.base import InatModel, ModelSpec
from inat.models.registry import create_model, list_models, register_model
from inat.models import pretrained, scratch  # noqa: F401 - imported to register their builders

__all__ = ["InatModel", "ModelSpec", "create_model", "list_models", "register_model", "build_from_config",
           "model_from_checkpoint", "model_from_state"]


def build_from_config(cfg: Any, num_classes: int) -> InatModel:
    """``create_model`` with the sections of a full run config (each builder takes the ones it reads)."""
    return create_model(cfg.model, num_classes=num_classes, image_size=int(cfg.data.image_size),
                        act=cfg.act, filters=cfg.filters)


def model_from_checkpoint(path: str | Path, *, use_ema: bool = True) -> Tuple[InatModel, ModelSpec, List[str]]:
    """Rebuild a model from an inat checkpoint alone: ``(model in eval mode, spec, classes)``.

    The EMA weights are used when the run kept them, since those are what it validated.
    Commands that score images use ``inat.predictor.Predictor.from_checkpoint``, which adds
    the device, precision, temperature and preprocessing.
    """
    state = load_checkpoint(path)
    try:
        model = model_from_state(state, use_ema=use_ema)
    except InatError as err:
        raise InatError(f"Checkpoint '{path}': {err}") from err
    return model, model.spec, list(state["classes"])


def model_from_state(state: dict, *, use_ema: bool = True) -> InatModel:
    """Rebuild the model of a loaded checkpoint dict, in eval mode, with its trained weights.

    Pretrained weights are not fetched again: the checkpoint overwrites them anyway, and
    fetching would need the network for torchvision/timm backbones.
    """
    cfg = OmegaConf.create(state["config"])
    cfg.model.pretrained = False
    cfg.model.weights_file = None
    weights = state.get("ema") if use_ema and state.get("ema") else state["model"]
    try:
        model = build_from_config(cfg, len(state["classes"]))
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        # A tampered or mismatched file (a shortened class list, missing tensors) fails here.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[0])
        raise InatError(f"the weights do not fit the {cfg.model.name} model its config describes with "
                        f"{len(state['classes'])} classes ({detail[:160].rstrip('.')}); it is not a complete inat checkpoint.") from err
    model.eval()
    return model
