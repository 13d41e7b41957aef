"""Model registry: ``create_model`` is the only way to build a model.

A builder is registered under a name and receives plain typed values (the model, act and
filters config sections, the class count, the image size); unknown names fail with the list
of valid ones.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from inat.errors import InatError
from inat.models.base import InatModel

Builder = Callable[..., InatModel]
_REGISTRY: Dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(model_cfg, *, num_classes, image_size, act, filters)``."""

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def create_model(model_cfg: Any, *, num_classes: int, image_size: int, act: Any = None, filters: Any = None) -> InatModel:
    """Build the model named ``model_cfg.name`` for ``num_classes`` outputs."""
    _load_builtin()
    name = model_cfg.name
    if name not in _REGISTRY:
        raise InatError(f"Unknown model '{name}': valid models are {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](model_cfg, num_classes=num_classes, image_size=image_size, act=act, filters=filters)


def _load_builtin() -> None:
    # Importing the modules runs their @register_model decorators.
    import inat.models.scratch  # noqa: F401

    try:
        import inat.models.pretrained  # noqa: F401
    except ModuleNotFoundError as err:  # pretrained backbones arrive with the fine-tuning work
        if err.name != "inat.models.pretrained":
            raise
