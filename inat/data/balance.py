"""Imbalanced training splits: how imbalanced, class weights for the loss, a balanced sampler.

``train.class_weights=auto`` weighs class c by ``n / (K * n_c)`` (scikit-learn's
"balanced"), so every class carries the same total weight in the loss whatever its size;
``none`` keeps the plain mean. ``train.balanced_sampler=true`` replaces an epoch's shuffled
order with a draw (with replacement) where every class is equally likely; use one or the
other, since both together over-correct.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from inat.errors import InatError

CLASS_WEIGHT_MODES = ("none", "auto")
IMBALANCE_RATIO = 1.5  # max/min class count above which a run summary calls the split imbalanced


def class_counts(labels: Any, n_classes: int) -> np.ndarray:
    """(K,) images per class."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]


def imbalance(labels: Any, n_classes: int) -> Dict[str, Any]:
    """``{counts, ratio (max/min, inf when a class is empty), imbalanced}`` for the run summary."""
    counts = class_counts(labels, n_classes)
    low = int(counts.min()) if len(counts) else 0
    ratio = float(counts.max() / low) if low > 0 else float("inf")
    return {"class_counts": counts.tolist(), "imbalance_ratio": round(ratio, 3), "imbalanced": ratio > IMBALANCE_RATIO}


def class_weights(labels: Any, n_classes: int, mode: str) -> Optional[torch.Tensor]:
    """Per-class loss weights (K,) float32 for ``F.cross_entropy(weight=...)``, or None for ``none``.

    ``auto``: ``n / (K * n_c)``, which is 1 for every class of a balanced split. A class
    absent from the split gets weight 0 (it has no samples to weigh; a huge weight would
    only matter through label smoothing or mixup targets).
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise InatError(f"Unknown train.class_weights '{mode}': valid are {', '.join(CLASS_WEIGHT_MODES)}.")
    if mode == "none":
        return None
    counts = class_counts(labels, n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def balanced_permutation(labels: Any, generator: torch.Generator, n_samples: Optional[int] = None) -> np.ndarray:
    """Positions into ``labels`` for one epoch, drawn with replacement so each class is equally likely.

    Returns ``n_samples`` (default ``len(labels)``) int64 positions; within a class every
    sample is equally likely. The draw uses ``generator``, so a seeded epoch repeats exactly.
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.bincount(y)
    p = 1.0 / counts[y]  # (N,) each class sums to 1
    w = torch.as_tensor(p / p.sum(), dtype=torch.float64)
    n = len(y) if n_samples is None else int(n_samples)
    return torch.multinomial(w, n, replacement=True, generator=generator).numpy().astype(np.int64)
