"""Model registry: ``create_model`` is the only way to build a model.

A leaf, as timm's ``_registry`` is: it imports no model module. The model modules register
their builders with ``@register_model`` when they are imported, and the package
``inat/models/__init__.py`` imports them all, so a registry reached through ``inat.models``
is always complete.

A builder receives its own ``model`` config section and the class count, plus only those of
``image_size``, ``act`` and ``filters`` that its signature names as keyword-only parameters
(the scratch CNN reads all three; a pretrained backbone none, since its input size and
activations belong to its weights). Unknown names fail with the list of valid ones.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Tuple

from inat.errors import InatError
from inat.models.base import InatModel

Builder = Callable[..., InatModel]
# What create_model can hand a builder besides its model section and num_classes.
INPUTS = ("image_size", "act", "filters")
_REGISTRY: Dict[str, Builder] = {}
_READS: Dict[str, Tuple[str, ...]] = {}  # name -> the INPUTS its builder takes


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(model_cfg, *, num_classes, [image_size], [act], [filters])`` as ``name``."""

    def wrap(fn: Builder) -> Builder:
        params = inspect.signature(fn).parameters
        keywords = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
        assert "num_classes" in keywords and set(keywords) <= {"num_classes", *INPUTS}, (
            f"builder {fn.__name__} takes {keywords}; a builder takes num_classes and any of {INPUTS}")
        _REGISTRY[name] = fn
        _READS[name] = tuple(p for p in keywords if p in INPUTS)
        return fn

    return wrap


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def model_inputs(name: str) -> Tuple[str, ...]:
    """The config inputs (of ``INPUTS``) the builder registered as ``name`` reads."""
    return _READS[name]


def create_model(model_cfg: Any, *, num_classes: int, image_size: int | None = None, act: Any = None,
                 filters: Any = None) -> InatModel:
    """Build the model named ``model_cfg.name`` for ``num_classes`` outputs.

    ``image_size``, ``act`` and ``filters`` go to the builder only when it reads them, so a
    caller holding a whole run config can pass every section and a backbone never sees
    settings it would ignore. A builder that needs one (without a default) refuses its absence.
    """
    name = model_cfg.name
    if name not in _REGISTRY:
        raise InatError(f"Unknown model '{name}': valid models are {', '.join(sorted(_REGISTRY))}.")
    given = {"image_size": image_size, "act": act, "filters": filters}
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    missing = [k for k in _READS[name] if given[k] is None and params[k].default is inspect.Parameter.empty]
    if missing:
        raise InatError(f"model={name} is built from {' and '.join(missing)} too, and create_model was not given "
                        f"{'them' if len(missing) > 1 else 'it'}.")
    return builder(model_cfg, num_classes=num_classes, **{k: given[k] for k in _READS[name] if given[k] is not None})
