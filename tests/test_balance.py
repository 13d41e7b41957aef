"""Imbalanced splits: class weights change the loss as specified; the balanced sampler draws classes evenly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inat.data.balance import balanced_permutation, class_weights, imbalance
from inat.errors import InatError


def test_auto_weights_are_n_over_k_times_class_count():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(labels, 3, "auto")
    assert w.tolist() == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    # every class now carries the same total weight, n / K
    assert [float(w[k]) * int((labels == k).sum()) for k in range(3)] == pytest.approx([100 / 3] * 3)
    assert class_weights(labels, 3, "none") is None
    assert class_weights(np.array([0, 1, 2, 0, 1, 2]), 3, "auto").tolist() == [1.0, 1.0, 1.0]  # balanced: no change
    assert class_weights(np.array([0, 0, 1]), 3, "auto")[2] == 0.0  # a class without images weighs nothing
    with pytest.raises(InatError, match="valid are none, auto"):
        class_weights(labels, 3, "balanced")


def test_class_weights_change_the_loss_as_specified():
    """Weighted cross-entropy = sum_i w[y_i] l_i / sum_i w[y_i]: the rare class counts for as much as the common one."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 4)
    logits = torch.randn(16, 2, generator=gen)
    w = class_weights(labels.numpy(), 2, "auto")
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    expected = (w[labels] * per_sample).sum() / w[labels].sum()
    weighted = F.cross_entropy(logits, labels, weight=w)
    assert float(weighted) == pytest.approx(float(expected))
    # with auto weights it is the mean of the per-class mean losses
    by_class = (per_sample[labels == 0].mean() + per_sample[labels == 1].mean()) / 2
    assert float(weighted) == pytest.approx(float(by_class))
    assert float(weighted) != pytest.approx(float(per_sample.mean()))


def test_balanced_permutation_draws_every_class_equally_and_repeats_with_its_seed():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    draw = balanced_permutation(labels, torch.Generator().manual_seed(0), n_samples=30_000)
    share = np.bincount(labels[draw], minlength=3) / len(draw)
    assert share == pytest.approx([1 / 3] * 3, abs=0.02)
    again = balanced_permutation(labels, torch.Generator().manual_seed(0), n_samples=30_000)
    assert np.array_equal(draw, again) and len(balanced_permutation(labels, torch.Generator())) == 1000


def test_imbalance_summary():
    assert imbalance(np.array([0] * 30 + [1] * 10), 2) == {"class_counts": [30, 10], "imbalance_ratio": 3.0,
                                                          "imbalanced": True}
    assert imbalance(np.array([0] * 14 + [1] * 10), 2)["imbalanced"] is False  # 1.4 <= 1.5
    assert imbalance(np.array([0, 0]), 2)["imbalance_ratio"] == float("inf")
