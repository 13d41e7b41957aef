"""First-layer filters as an image grid, and that layer's feature maps for one image.

Filters come from ``model.first_conv()`` whatever the architecture. Each filter is scaled to
[0, 1] on its own (filters differ a lot in norm; a shared scale leaves most of them grey)
and drawn in RGB when the layer reads 3 channels, else as its channel mean in grey.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from inat.explain.scoring import model_device, normalise
from inat.models.base import InatModel, ModelSpec


def grid_shape(count: int) -> Tuple[int, int]:
    """(rows, cols) close to square that hold ``count`` tiles: 64 -> (8, 8), 32 -> (6, 6), 10 -> (3, 4)."""
    cols = max(1, math.ceil(math.sqrt(count)))
    return math.ceil(count / cols), cols


def filter_images(weight: torch.Tensor) -> np.ndarray:
    """(C_out, C_in, k, k) weights -> (C_out, k, k, 3) floats in [0, 1], each filter scaled alone."""
    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(1, keepdim=True).expand(-1, 3, -1, -1)  # grey view of non-RGB filters
    w = w.permute(0, 2, 3, 1).numpy()  # (C_out, k, k, 3)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    return (w - lo) / np.maximum(hi - lo, 1e-12)


def draw_filters(model: InatModel, out: Path) -> Dict:
    """Write every first-layer filter as one tile of a near-square grid to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = model.first_conv()
    tiles = filter_images(conv.weight)
    rows, cols = grid_shape(len(tiles))
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, tile in enumerate(tiles):
        axes.flat[i].imshow(tile, interpolation="nearest")
        axes.flat[i].set_title(str(i), fontsize=6, pad=1)
    k = tuple(conv.weight.shape[2:])
    fig.suptitle(f"First-layer filters: {len(tiles)} of {k[0]}x{k[1]}x{conv.weight.shape[1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return {"count": len(tiles), "grid": [rows, cols], "kernel": list(k)}


def draw_feature_maps(model: InatModel, spec: ModelSpec, image: np.ndarray, out: Path, title: str = "") -> Dict:
    """Write ``image`` (S, S, 3 uint8) next to the first conv layer's output maps, one tile each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = []
    handle = model.first_conv().register_forward_hook(lambda _m, _i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            model(normalise(image[None], spec, model_device(model)))  # the whole forward, so hooks see the real input path
    finally:
        handle.remove()
    maps = captured[0][0].float().cpu().numpy()  # (C, S, S)
    rows, cols = grid_shape(len(maps))
    fig = plt.figure(figsize=(2.8 + 1.0 * cols, max(2.8, 1.0 * rows + 0.4)))
    gs = fig.add_gridspec(rows, cols + 3)
    ax = fig.add_subplot(gs[:, :3])
    ax.imshow(image)
    ax.set_title(title or "input", fontsize=8)
    ax.axis("off")
    for i, fmap in enumerate(maps):
        a = fig.add_subplot(gs[i // cols, 3 + i % cols])
        a.imshow(fmap, cmap="viridis")  # each map on its own colour scale
        a.set_title(str(i), fontsize=6, pad=1)
        a.axis("off")
    fig.suptitle(f"First-layer feature maps ({len(maps)} channels, before the activation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return {"channels": len(maps)}
