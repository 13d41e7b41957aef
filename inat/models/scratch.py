"""The assignment's CNN, with its closed-form parameter and multiply-add counts beside it.

5 x (conv k_i x k_i, 'same' padding -> [batch norm] -> activation -> max-pool 2x2) -> flatten
(blocks 1-4 pool before a non-decreasing activation such as ReLU: the same function, cheaper)
-> dense(n) -> activation -> dropout -> linear(classes). Filters per block come from the
``filters`` group (same / doubling / halving from a base m, or a custom list of 5).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from inat.choices import ACTIVATIONS
from inat.errors import InatError
from inat.models.base import InatModel, ModelSpec
from inat.models.registry import register_model

N_BLOCKS = 5
# Non-decreasing activations: max(f(a), f(b)) == f(max(a, b)), so they commute with max-pooling.
MONOTONE = ("relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid")


def make_activation(name: str, *, negative_slope: float = 0.01, alpha: float = 1.0) -> nn.Module:
    """A fresh activation module by name (each block gets its own so hooks can tell them apart)."""
    table = {
        "relu": lambda: nn.ReLU(),
        "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(),
        "mish": lambda: nn.Mish(),
        "elu": lambda: nn.ELU(alpha=alpha),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope),
        "selu": lambda: nn.SELU(),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "hardswish": lambda: nn.Hardswish(),
    }
    if name not in table:
        raise InatError(f"Unknown activation '{name}': valid activations are {', '.join(ACTIVATIONS)}.")
    return table[name]()


def filter_counts(organisation: str, base: int, custom: Sequence[int] | None = None) -> List[int]:
    """Filters per block: same (m each), doubling (m, 2m, ...), halving (m, m/2, ...), custom."""
    if base < 1:
        raise InatError(f"filters.base must be a positive integer, got {base}.")
    if organisation == "same":
        return [base] * N_BLOCKS
    if organisation == "doubling":
        return [base * 2**i for i in range(N_BLOCKS)]
    if organisation == "halving":
        return [max(1, base // 2**i) for i in range(N_BLOCKS)]
    if organisation == "custom":
        if custom is None or len(custom) != N_BLOCKS:
            n = 0 if custom is None else len(custom)
            raise InatError(f"filters.custom must list exactly {N_BLOCKS} filter counts, got {n}.")
        if any(int(c) < 1 for c in custom):
            raise InatError(f"filters.custom must hold positive integers, got {list(custom)}.")
        return [int(c) for c in custom]
    raise InatError(f"Unknown filters.organisation '{organisation}': valid are same, doubling, halving, custom.")


def kernel_sizes(kernel_size: Any) -> List[int]:
    """``model.kernel_size`` as one int per block (an int applies to all five)."""
    if isinstance(kernel_size, int):
        sizes = [kernel_size] * N_BLOCKS
    else:
        sizes = [int(k) for k in kernel_size]
        if len(sizes) != N_BLOCKS:
            raise InatError(f"model.kernel_size must be one int or a list of {N_BLOCKS} ints, got {len(sizes)} values.")
    if any(k < 1 for k in sizes):
        raise InatError(f"model.kernel_size values must be positive, got {sizes}.")
    return sizes


def feature_sides(size: int) -> List[int]:
    """Side length entering each block, then after the last pool: [H, H//2, ..., H//32]."""
    sides = [size]
    for _ in range(N_BLOCKS):
        sides.append(sides[-1] // 2)
    return sides


@dataclass(frozen=True)
class Architecture:
    """Everything the counts depend on, as plain numbers."""

    channels: tuple  # output channels of the 5 conv layers
    kernels: tuple
    dense_units: int
    num_classes: int
    height: int
    width: int
    batch_norm: bool
    in_channels: int = 3


def count_params(a: Architecture) -> int:
    """Closed-form trainable parameters: conv weights+biases, BN affine, dense, output."""
    total, c_in = 0, a.in_channels
    for c, k in zip(a.channels, a.kernels):
        total += k * k * c_in * c + c + (2 * c if a.batch_norm else 0)
        c_in = c
    flat = a.channels[-1] * feature_sides(a.height)[-1] * feature_sides(a.width)[-1]
    return total + flat * a.dense_units + a.dense_units + a.dense_units * a.num_classes + a.num_classes


def count_macs(a: Architecture) -> int:
    """Closed-form multiply-adds of one forward pass (conv + dense; biases, BN, pools excluded).

    A 'same' conv at block i keeps the side, so it costs k_i^2 * C_{i-1} * C_i * H_i * W_i,
    with H_i = H // 2^i; this is what torch's FLOP counter measures (divided by 2).
    """
    hs, ws = feature_sides(a.height), feature_sides(a.width)
    total, c_in = 0, a.in_channels
    for i, (c, k) in enumerate(zip(a.channels, a.kernels)):
        total += k * k * c_in * c * hs[i] * ws[i]
        c_in = c
    flat = a.channels[-1] * hs[-1] * ws[-1]
    return total + flat * a.dense_units + a.dense_units * a.num_classes


# The assignment's question: m filters of k x k in every layer, n dense units, H x W x 3 input,
# 10 classes, no batch norm. With H, W divisible by 32 these are exact.
FORMULA_PARAMS = "(3k^2 m + m) + 4(k^2 m^2 + m) + m (H/32)(W/32) n + n + 10n + 10"
FORMULA_MACS = "3k^2 m HW + k^2 m^2 HW (1/4 + 1/16 + 1/64 + 1/256) + m (HW/1024) n + 10n"


class ScratchCNN(InatModel):
    """Five conv-act-pool blocks, one dense layer, one output layer."""

    def __init__(self, arch: Architecture, act: str, dense_act: str, dropout: float, dropout_where: str,
                 act_kwargs: dict | None = None) -> None:
        super().__init__()
        if dropout_where not in ("dense", "conv", "both"):
            raise InatError(f"Unknown model.dropout_where '{dropout_where}': valid are dense, conv, both.")
        if not 0.0 <= dropout < 1.0:
            raise InatError(f"model.dropout must be in [0, 1), got {dropout}.")
        act_kwargs = act_kwargs or {}
        self.arch = arch
        blocks, c_in = [], arch.in_channels
        for c, k in zip(arch.channels, arch.kernels):
            layers: "OrderedDict[str, nn.Module]" = OrderedDict()
            layers["conv"] = nn.Conv2d(c_in, c, k, padding="same")
            if arch.batch_norm:
                layers["bn"] = nn.BatchNorm2d(c)
            if act in MONOTONE and len(blocks) < N_BLOCKS - 1:
                # max-pool commutes with a non-decreasing activation, so pooling first is the same
                # function (and gradient) at a quarter of the activation's memory traffic. CONV5
                # keeps act -> pool: last_conv() must expose its activations before pooling.
                layers["pool"] = nn.MaxPool2d(2)
                layers["act"] = make_activation(act, **act_kwargs)
            else:
                layers["act"] = make_activation(act, **act_kwargs)
                layers["pool"] = nn.MaxPool2d(2)
            if dropout_where in ("conv", "both") and dropout > 0:
                layers["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        flat = arch.channels[-1] * feature_sides(arch.height)[-1] * feature_sides(arch.width)[-1]
        self.dense = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(),
            fc=nn.Linear(flat, arch.dense_units),
            act=make_activation(dense_act, **act_kwargs),
            drop=nn.Dropout(dropout if dropout_where in ("dense", "both") else 0.0),
        ))
        self.out = nn.Linear(arch.dense_units, arch.num_classes)
        self.native_map = (feature_sides(arch.height)[-1], feature_sides(arch.width)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        maps = self.blocks(x)
        if maps.shape[-2:] != self.native_map:
            # Another input size than the architecture's (progressive resizing trains smaller): average
            # the last map to the native one, so the dense layer's input keeps its shape. At the native
            # size nothing runs, so the model, its counts and its exports are the assignment's.
            maps = F.adaptive_avg_pool2d(maps, self.native_map)
        return self.out(self.dense(maps))

    def first_conv(self) -> nn.Conv2d:
        return self.blocks[0].conv

    def last_conv(self) -> nn.Module:
        return self.blocks[-1].act  # CONV5 after its activation, before pooling: (B, C5, H/16, W/16)

    def cam_layer_name(self) -> str:
        return f"blocks.{len(self.blocks) - 1}.act"  # the module last_conv() returns

    def layer_groups(self) -> List[nn.Module]:
        return [*self.blocks, self.dense, self.out]

    def head(self) -> nn.Module:
        return self.out


def architecture_from_config(model_cfg: Any, *, num_classes: int, image_size: int, filters: Any) -> Architecture:
    """Plain numbers from the config sections; checks the input survives 5 poolings."""
    if image_size < 2**N_BLOCKS:
        raise InatError(
            f"data.image_size={image_size} is too small for {N_BLOCKS} max-poolings of 2x2: use at least {2**N_BLOCKS}."
        )
    if model_cfg.dense_units < 1:
        raise InatError(f"model.dense_units must be positive, got {model_cfg.dense_units}.")
    channels = filter_counts(filters.organisation, filters.base, filters.custom)
    return Architecture(tuple(channels), tuple(kernel_sizes(model_cfg.kernel_size)), int(model_cfg.dense_units),
                        int(num_classes), int(image_size), int(image_size), bool(model_cfg.batch_norm))


@register_model("scratch")
def build_scratch(model_cfg: Any, *, num_classes: int, image_size: int, act: Any = None, filters: Any) -> ScratchCNN:
    """Build the scratch CNN from its sections: ``model``, ``act`` (None: ReLU), ``filters`` and
    ``data.image_size``; ``model.dense_act`` null means the ``act`` choice."""
    arch = architecture_from_config(model_cfg, num_classes=num_classes, image_size=image_size, filters=filters)
    act_name = act.name if act is not None else "relu"
    act_kwargs = {}
    if act is not None:
        act_kwargs = {"negative_slope": float(act.negative_slope), "alpha": float(act.alpha)}
    net = ScratchCNN(arch, act_name, model_cfg.dense_act or act_name, float(model_cfg.dropout),
                     model_cfg.dropout_where, act_kwargs)
    net.spec = ModelSpec(name="scratch", num_classes=num_classes, input_size=image_size)
    return net


def assignment_counts(m: int, k: int, n: int, height: int, width: int) -> tuple[int, int]:
    """FORMULA_PARAMS and FORMULA_MACS evaluated (10 classes, no BN, H and W divisible by 32)."""
    hw = height * width
    params = (3 * k * k * m + m) + 4 * (k * k * m * m + m) + m * (height // 32) * (width // 32) * n + n + 10 * n + 10
    macs = 3 * k * k * m * hw + k * k * m * m * (hw // 4 + hw // 16 + hw // 64 + hw // 256) + m * (hw // 1024) * n + 10 * n
    return params, macs
