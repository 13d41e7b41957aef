"""Models: the registry, the scratch CNN, pretrained backbones and freezing strategies."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

from inat.models.base import InatModel, ModelSpec
from inat.models.registry import create_model, list_models, register_model

__all__ = ["InatModel", "ModelSpec", "create_model", "list_models", "register_model", "build_from_config",
           "model_from_checkpoint"]


def build_from_config(cfg: Any, num_classes: int) -> InatModel:
    """``create_model`` with the sections of a full run config."""
    return create_model(cfg.model, num_classes=num_classes, image_size=int(cfg.data.image_size),
                        act=cfg.act, filters=cfg.filters)


def model_from_checkpoint(path: str | Path, *, use_ema: bool = True) -> Tuple[InatModel, ModelSpec, List[str]]:
    """Rebuild a model from an inat checkpoint alone: ``(model in eval mode, spec, classes)``.

    The EMA weights are used when the run kept them, since those are what it validated.
    """
    from omegaconf import OmegaConf

    from inat.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    classes = list(state["classes"])
    model = build_from_config(cfg, len(classes))
    weights = state.get("ema") if use_ema and state.get("ema") else state["model"]
    model.load_state_dict(weights)
    model.eval()
    return model, model.spec, classes
