"""The small interface every inat model has, whatever builds it.

Code that draws filters, runs guided backprop, freezes layers or exports a model asks this
interface (``first_conv``, ``last_conv``, ``cam_layer_name``, ``layer_groups``, ``head``) and
``spec``; it never inspects concrete classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import torch.nn as nn


@dataclass
class ModelSpec:
    """What the data pipeline and the tools need to know about a built model."""

    name: str
    num_classes: int
    input_size: int
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    # Resize the shorter side to input_size / crop_pct, then centre-crop input_size (1.0 = no margin).
    crop_pct: float = 1.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class InatModel(nn.Module):
    """Base class: ``forward(x)`` maps (B, 3, H, W) normalised floats to (B, classes) logits."""

    spec: ModelSpec

    def first_conv(self) -> nn.Conv2d:
        """The convolution applied to the input image (its filters are drawn by explain)."""
        raise NotImplementedError

    def last_conv(self) -> nn.Module:
        """The module whose output holds the last conv block's activations (CONV5)."""
        raise NotImplementedError

    def cam_layer_name(self) -> str:
        """Dotted name (for ``get_submodule``) of the layer Grad-CAM weighs: the last spatial
        feature map before pooling (scratch CONV5, a backbone's last convolutional stage)."""
        raise NotImplementedError

    def cam_layer(self) -> nn.Module:
        """The module named by ``cam_layer_name``; by name, so an EMA copy or a reload finds its own."""
        return self.get_submodule(self.cam_layer_name())

    def layer_groups(self) -> List[nn.Module]:
        """Parameter groups from input to output, the head last; freezing walks these."""
        raise NotImplementedError

    def head(self) -> nn.Module:
        """The classifier layer replaced for a new dataset."""
        raise NotImplementedError
