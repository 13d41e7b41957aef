"""Darknet YOLOv3 (and -tiny) in PyTorch: parse a ``.cfg``, build the network, read ``.weights``.

The network is built layer by layer from the cfg blocks in file order, because darknet's
``route``/``shortcut`` indices and the ``.weights`` file both refer to that order. Supported
blocks: convolutional (with or without batch norm), maxpool (including tiny's size=2
stride=1 that keeps the size), upsample, route (with ``groups``/``group_id``), shortcut and
yolo. The ``[net]`` block gives the input size and channels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inat.errors import InatError

Block = Dict[str, str]


def parse_cfg(path: str | Path) -> List[Block]:
    """Read a darknet ``.cfg`` into a list of blocks (``{"type": ..., key: value}``).

    Comments (``#``/``;``) and blank lines are dropped; the first block must be ``[net]``.
    Values stay strings so each layer parses the keys it knows; unknown block types are
    refused with the line they start on, so an unsupported model fails at load time.
    """
    path = Path(path)
    if not path.is_file():
        raise InatError(f"Darknet cfg file {path} does not exist.")
    blocks: List[Block] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise InatError(f"{path}:{number}: section header '{line}' has no closing ']'.")
            blocks.append({"type": line[1:-1].strip().lower(), "_line": str(number)})
        elif "=" in line and blocks:
            key, value = line.split("=", 1)
            blocks[-1][key.strip()] = value.strip()
        else:
            raise InatError(f"{path}:{number}: cannot parse '{line}' as 'key=value' inside a [section].")
    if not blocks or blocks[0]["type"] not in ("net", "network"):
        raise InatError(f"{path} does not start with a [net] section, so it is not a darknet cfg.")
    return blocks


def _ints(value: str) -> List[int]:
    return [int(v) for v in value.replace(" ", "").split(",") if v]


def _activation(name: str) -> nn.Module:
    if name == "leaky":
        return nn.LeakyReLU(0.1)
    if name == "linear":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "mish":
        return nn.Mish()
    if name in ("swish", "silu"):
        return nn.SiLU()
    if name == "logistic":
        return nn.Sigmoid()
    raise InatError(f"Darknet activation '{name}' is not supported (leaky, linear, relu, mish, swish, logistic are).")


class MaxPoolSame(nn.Module):
    """Darknet maxpool: pads ``size-1`` pixels (half before, half after) with -inf.

    With size=2 stride=1 (yolov3-tiny's sixth pool) this keeps 13x13 at 13x13, which a
    plain ``nn.MaxPool2d`` would shrink to 12x12 and misalign every later layer.
    """

    def __init__(self, size: int, stride: int, padding: Optional[int] = None) -> None:
        super().__init__()
        self.size, self.stride = size, stride
        self.padding = size - 1 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.padding // 2
        x = F.pad(x, (before, self.padding - before, before, self.padding - before), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class Route(nn.Module):
    """Concatenate earlier outputs (channel slice ``group_id`` of ``groups`` from each)."""

    def __init__(self, layers: Sequence[int], groups: int = 1, group_id: int = 0) -> None:
        super().__init__()
        self.layers, self.groups, self.group_id = list(layers), groups, group_id

    def forward(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        parts = [outputs[i].chunk(self.groups, dim=1)[self.group_id] for i in self.layers]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Shortcut(nn.Module):
    """Residual add of the previous output and the output of layer ``source``."""

    def __init__(self, source: int, activation: nn.Module) -> None:
        super().__init__()
        self.source, self.activation = source, activation

    def forward(self, previous: torch.Tensor, outputs: List[torch.Tensor]) -> torch.Tensor:
        return self.activation(previous + outputs[self.source])


class YoloLayer(nn.Module):
    """Decode one YOLO head into boxes in network-input pixels.

    Input ``(B, A*(5+C), H, W)``; output ``(B, A*H*W, 5+C)`` holding centre x, centre y,
    width, height (pixels of the ``net_size`` square input), objectness and per-class
    probabilities (sigmoids, as darknet's yolo layer uses).
    """

    def __init__(self, anchors: Sequence[Tuple[float, float]], classes: int, scale_xy: float = 1.0) -> None:
        super().__init__()
        self.classes, self.scale_xy = classes, scale_xy
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)  # (A, 2)

    def forward(self, x: torch.Tensor, net_size: Tuple[int, int]) -> torch.Tensor:
        batch, _, height, width = x.shape
        anchors = self.anchors.to(x.dtype)
        count = anchors.shape[0]
        x = x.view(batch, count, 5 + self.classes, height, width).permute(0, 1, 3, 4, 2)  # (B, A, H, W, 5+C)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, device=x.device, dtype=x.dtype),
            torch.arange(width, device=x.device, dtype=x.dtype),
            indexing="ij",
        )
        # scale_xy > 1 (YOLOv4) lets centres reach the cell borders; 1 is plain YOLOv3.
        offset = torch.sigmoid(x[..., :2]) * self.scale_xy - (self.scale_xy - 1) / 2
        net_h, net_w = net_size
        cx = (offset[..., 0] + grid_x) * (net_w / width)
        cy = (offset[..., 1] + grid_y) * (net_h / height)
        w = torch.exp(x[..., 2]) * anchors[:, 0].view(1, count, 1, 1)
        h = torch.exp(x[..., 3]) * anchors[:, 1].view(1, count, 1, 1)
        rest = torch.sigmoid(x[..., 4:])  # objectness + class probabilities
        out = torch.cat([torch.stack([cx, cy, w, h], dim=-1), rest], dim=-1)
        return out.reshape(batch, count * height * width, 5 + self.classes)


class Darknet(nn.Module):
    """A darknet network built from cfg blocks; ``forward`` returns all YOLO heads' boxes.

    ``forward(x)`` takes ``(B, 3, H, W)`` floats in [0, 1] (RGB, letterboxed) and returns
    ``(B, N, 5+C)`` rows of (cx, cy, w, h, objectness, class probs...) in input pixels.
    ``conv_layers()`` lists (conv, batch norm or None) pairs in file order for the weights.
    """

    def __init__(self, blocks: List[Block], source: str = "cfg") -> None:
        super().__init__()
        net = blocks[0]
        self.width = int(net.get("width", 416))
        self.height = int(net.get("height", 416))
        channels = int(net.get("channels", 3))
        self.blocks = blocks[1:]
        self.layers = nn.ModuleList()
        out_channels: List[int] = []
        self.classes = 0
        for index, block in enumerate(self.blocks):
            kind = block["type"]
            where = f"{source} line {block['_line']} ([{kind}], layer {index})"
            try:
                layer, channels = self._build(block, index, channels, out_channels)
            except (KeyError, ValueError, IndexError) as err:
                raise InatError(f"Cannot build {where}: bad or missing value ({err}).") from None
            if isinstance(layer, YoloLayer):
                self.classes = layer.classes
            self.layers.append(layer)
            out_channels.append(channels)
        if self.classes == 0:
            raise InatError(f"{source} has no [yolo] layer, so it is not a YOLO detector.")
        # Which outputs a later route/shortcut reads: only those are kept during forward.
        self._keep = set()
        for layer in self.layers:
            if isinstance(layer, Route):
                self._keep.update(layer.layers)
            elif isinstance(layer, Shortcut):
                self._keep.add(layer.source)

    def _build(self, block: Block, index: int, channels: int, out_channels: List[int]) -> Tuple[nn.Module, int]:
        kind = block["type"]
        if kind == "convolutional":
            filters, size = int(block["filters"]), int(block.get("size", 1))
            stride = int(block.get("stride", 1))
            pad = size // 2 if int(block.get("pad", 0)) else int(block.get("padding", 0))
            groups = int(block.get("groups", 1))
            batch_norm = bool(int(block.get("batch_normalize", 0)))
            seq = nn.Sequential()
            seq.add_module("conv", nn.Conv2d(channels, filters, size, stride, pad, groups=groups, bias=not batch_norm))
            if batch_norm:
                seq.add_module("bn", nn.BatchNorm2d(filters, momentum=0.01, eps=1e-5))
            seq.add_module("act", _activation(block.get("activation", "logistic")))
            return seq, filters
        if kind == "maxpool":
            size = int(block.get("size", 1))
            stride = int(block.get("stride", 1))
            padding = int(block["padding"]) if "padding" in block else None
            return MaxPoolSame(size, stride, padding), channels
        if kind == "upsample":
            return nn.Upsample(scale_factor=int(block.get("stride", 2)), mode="nearest"), channels
        if kind == "route":
            layers = [i if i >= 0 else index + i for i in _ints(block["layers"])]
            if any(not 0 <= i < index for i in layers):
                raise InatError(f"[route] at layer {index} refers to layers {layers} outside 0..{index - 1}.")
            groups, group_id = int(block.get("groups", 1)), int(block.get("group_id", 0))
            total = sum(out_channels[i] for i in layers) // groups
            return Route(layers, groups, group_id), total
        if kind == "shortcut":
            source = int(block["from"])
            source = source if source >= 0 else index + source
            if out_channels[source] != channels:
                raise InatError(f"[shortcut] at layer {index} adds {out_channels[source]} to {channels} channels.")
            return Shortcut(source, _activation(block.get("activation", "linear"))), channels
        if kind == "yolo":
            mask = _ints(block.get("mask", ""))
            flat = [float(v) for v in block["anchors"].replace(" ", "").split(",") if v]
            pairs = list(zip(flat[0::2], flat[1::2]))
            mask = mask or list(range(len(pairs)))
            classes = int(block.get("classes", 80))
            if channels != len(mask) * (5 + classes):
                raise InatError(
                    f"[yolo] at layer {index} gets {channels} channels but {len(mask)} anchors x "
                    f"(5 + {classes} classes) need {len(mask) * (5 + classes)}."
                )
            return YoloLayer([pairs[m] for m in mask], classes, float(block.get("scale_x_y", 1.0))), channels
        raise InatError(f"Darknet block [{kind}] is not supported by this loader.")

    def conv_layers(self) -> List[Tuple[nn.Conv2d, Optional[nn.BatchNorm2d]]]:
        """(conv, batch norm or None) for every convolutional block, in cfg order."""
        pairs = []
        for layer in self.layers:
            if isinstance(layer, nn.Sequential) and hasattr(layer, "conv"):
                pairs.append((layer.conv, getattr(layer, "bn", None)))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net_size = (x.shape[2], x.shape[3])
        outputs: List[Optional[torch.Tensor]] = []
        heads = []
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Route):
                x = layer(outputs)  # type: ignore[arg-type]
            elif isinstance(layer, Shortcut):
                x = layer(x, outputs)  # type: ignore[arg-type]
            elif isinstance(layer, YoloLayer):
                heads.append(layer(x, net_size))
            else:
                x = layer(x)
            # Keep only what a later layer reads, so a big input does not hold every map.
            outputs.append(x if index in self._keep else None)
        return torch.cat(heads, dim=1)  # (B, N, 5+C)


def count_weights(model: Darknet) -> int:
    """Number of float32 values a ``.weights`` file holds after its header for ``model``."""
    total = 0
    for conv, bn in model.conv_layers():
        total += conv.weight.numel() + (4 * bn.num_features if bn is not None else conv.out_channels)
    return total


def _read_header(data: bytes, path: Path) -> Tuple[Tuple[int, int, int, int], int]:
    """Return ((major, minor, revision, seen), header bytes) as darknet writes them."""
    if len(data) < 16:
        raise InatError(f"Weights file {path} has {len(data)} bytes, too few for a darknet header.")
    major, minor, revision = np.frombuffer(data, dtype="<i4", count=3).tolist()
    # Darknet >= 0.2 writes `seen` as a 64-bit size_t; older files used 32 bits.
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        seen = int(np.frombuffer(data, dtype="<i8", count=1, offset=12)[0])
        return (major, minor, revision, seen), 20
    seen = int(np.frombuffer(data, dtype="<i4", count=1, offset=12)[0])
    return (major, minor, revision, seen), 16


def load_weights(model: Darknet, path: str | Path) -> Tuple[int, int, int, int]:
    """Fill ``model`` from a darknet ``.weights`` file; return its header.

    Order per convolutional block: with batch norm, BN bias (beta), scale (gamma), running
    mean, running variance, then the conv kernel; without, conv bias then kernel. Every
    byte must be consumed: a file of another size means the cfg and weights do not belong
    together, and the error names the expected and actual counts.
    """
    path = Path(path)
    if not path.is_file():
        raise InatError(f"Weights file {path} does not exist.")
    data = path.read_bytes()
    header, start = _read_header(data, path)
    expected = count_weights(model)
    body = len(data) - start
    if body != 4 * expected:
        raise InatError(
            f"Weights file {path} does not match its cfg: the cfg needs {expected} float32 values "
            f"({4 * expected} bytes after the {start}-byte header) but the file holds {body} bytes "
            f"({body / 4:g} values)."
        )
    values = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=start).copy())
    cursor = 0

    def take(target: torch.Tensor) -> None:
        nonlocal cursor
        n = target.numel()
        target.copy_(values[cursor:cursor + n].view_as(target))
        cursor += n

    with torch.no_grad():
        for conv, bn in model.conv_layers():
            if bn is not None:
                for tensor in (bn.bias, bn.weight, bn.running_mean, bn.running_var):
                    take(tensor)
            else:
                take(conv.bias)
            take(conv.weight)
    assert cursor == expected, (cursor, expected)
    return header


def load_darknet(cfg_path: str | Path, weights_path: str | Path) -> Darknet:
    """Build the network from ``cfg_path``, load ``weights_path`` and return it in eval mode."""
    model = Darknet(parse_cfg(cfg_path), source=str(cfg_path))
    load_weights(model, weights_path)
    return model.eval()
