"""Where the model goes wrong: confusion matrix, per-class accuracy, confused pairs, worst mistakes."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """(K,) fraction correct per true class from a (K, K) confusion matrix (NaN for empty rows)."""
    totals = cm.sum(1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


def confused_pairs(cm: np.ndarray, classes: List[str], top: int = 5) -> List[Dict]:
    """The ``top`` most frequent (true -> predicted) mistakes, most frequent first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, cm.shape)
        if off[t, p] == 0:
            break
        pairs.append({"true": classes[t], "pred": classes[p], "count": int(off[t, p]),
                      "share_of_true": float(off[t, p] / max(1, cm[t].sum()))})
    return pairs


def worst_mistakes(labels: np.ndarray, probs: np.ndarray, top: int = 10) -> List[int]:
    """Indices of the ``top`` highest-confidence wrong predictions."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    return [int(i) for i in wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:top]]


def draw_confusion(scores, out_matrix: Path, out_mistakes: Path) -> Dict:
    """Two figures: matrix + per-class accuracy bars + top confused pairs; and the worst mistakes.

    ``scores`` is a ``TestScores``. Returns the numbers behind the figures for explain.json.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = scores.confusion()
    k = len(scores.classes)
    acc = per_class_accuracy(cm)
    pairs = confused_pairs(cm, scores.classes)

    fig = plt.figure(figsize=(15, 5.5))
    gs = fig.add_gridspec(1, 3, width_ratios=[1.25, 0.7, 0.7], wspace=1.0)  # room for the long pair labels
    ax = fig.add_subplot(gs[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # row-normalised: readable with unequal classes
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for t in range(k):
        for p in range(k):
            if cm[t, p]:
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=6,
                        color="white" if rates[t, p] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(scores.classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticklabels(scores.classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (n={int(cm.sum())}, accuracy {100 * scores.accuracy:.1f}%)", fontsize=9)

    ax = fig.add_subplot(gs[1])
    ax.barh(range(k)[::-1], np.nan_to_num(acc) * 100, color="#4a7ab0")
    for i, a in enumerate(acc):
        ax.text(min(np.nan_to_num(a) * 100 + 1, 88), k - 1 - i, "n/a" if np.isnan(a) else f"{100 * a:.1f}%",
                va="center", fontsize=7)
    ax.set_yticks(range(k)[::-1])
    ax.set_yticklabels(scores.classes, fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title("Per-class accuracy", fontsize=9)

    ax = fig.add_subplot(gs[2])
    labels = [f"{p['true']} → {p['pred']}" for p in pairs]
    ax.barh(range(len(pairs))[::-1], [p["count"] for p in pairs], color="#d7191c")
    ax.set_yticks(range(len(pairs))[::-1])
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("test images")
    ax.set_title("Most confused pairs (true → predicted)", fontsize=9)
    fig.savefig(out_matrix, dpi=80, bbox_inches="tight")
    plt.close(fig)

    worst = worst_mistakes(scores.labels, scores.probs)
    cols = 5
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows + 0.3), squeeze=False, layout="constrained")
    for a in axes.flat:
        a.axis("off")
    mistakes = []
    for a, i in zip(axes.flat, worst):
        p = scores.probs[i]
        pred, true = int(p.argmax()), int(scores.labels[i])
        a.imshow(scores.images[i])
        a.set_title(f"true {scores.classes[true]}\npred {scores.classes[pred]} {100 * p[pred]:.0f}%", fontsize=7,
                    color="#d7191c")
        mistakes.append({"image": str(scores.paths[i]), "true": scores.classes[true], "pred": scores.classes[pred],
                         "confidence": float(p[pred])})
    if not worst:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Worst mistakes: the most confident wrong predictions", fontsize=9)
    fig.savefig(out_mistakes, dpi=80)
    plt.close(fig)
    return {
        "accuracy": scores.accuracy,
        "n": int(cm.sum()),
        "per_class_accuracy": {c: (None if np.isnan(a) else float(a)) for c, a in zip(scores.classes, acc)},
        "confusion_matrix": cm.tolist(),
        "confused_pairs": pairs,
        "worst_mistakes": mistakes,
    }
