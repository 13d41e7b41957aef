"""The prediction grid: a few test images per class, each with its verdict and top-3 bars.

One row per class, ``per_class`` columns. Every cell shows the image in a green (correct)
or red (wrong) frame, the predicted label and its confidence as the title, and the
model's three most probable classes as small horizontal bars (the true class's bar green).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from inat.choices import GRID_PICKS
from inat.errors import InatError

PICKS = GRID_PICKS
GREEN, RED, GREY = "#1a9641", "#d7191c", "#9e9e9e"


def pick_examples(labels: np.ndarray, probs: np.ndarray, per_class: int, pick: str, seed: int) -> List[List[int]]:
    """Indices of the images to show, one list per class (shorter when a class has fewer).

    random: a seeded sample; confident: the highest-confidence predictions among the
    class's images; mistakes: the highest-confidence wrong predictions first, topped up
    with a seeded sample of the rest when a class has fewer mistakes than ``per_class``.
    """
    if pick not in PICKS:
        raise InatError(f"Unknown explain.pick '{pick}': valid are {', '.join(PICKS)}.")
    rng = np.random.default_rng(seed)
    preds, conf = probs.argmax(1), probs.max(1)
    rows: List[List[int]] = []
    for k in range(probs.shape[1]):
        members = np.flatnonzero(labels == k)
        if pick == "random":
            chosen = rng.permutation(members)[:per_class]
        elif pick == "confident":
            chosen = members[np.argsort(-conf[members], kind="stable")][:per_class]
        else:
            wrong = members[preds[members] != k]
            wrong = wrong[np.argsort(-conf[wrong], kind="stable")]
            rest = rng.permutation(members[preds[members] == k])
            chosen = np.concatenate([wrong, rest])[:per_class]
        rows.append([int(i) for i in chosen])
    return rows


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def draw_grid(scores, out: Path, per_class: int = 3, pick: str = "random", seed: int = 0) -> Dict:
    """Write the prediction grid of ``scores`` (a ``TestScores``) to ``out``; return what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pick_examples(scores.labels, scores.probs, per_class, pick, seed)
    n_rows = len(rows)
    height = 1.75 * n_rows + 0.5
    fig = plt.figure(figsize=(3.7 * per_class, height))
    gs = fig.add_gridspec(n_rows, 2 * per_class, width_ratios=[1.0, 1.1] * per_class, wspace=0.08, hspace=0.45,
                          left=0.04, right=0.99, bottom=0.01, top=1 - 0.55 / height)
    shown = []
    for r, indices in enumerate(rows):
        for c in range(per_class):
            ax_img = fig.add_subplot(gs[r, 2 * c])
            ax_bar = fig.add_subplot(gs[r, 2 * c + 1])
            ax_img.set_xticks([])
            ax_img.set_yticks([])
            if c == 0:
                ax_img.set_ylabel(_short(scores.classes[r], 18), fontsize=8, fontweight="bold")
            if c >= len(indices):  # the class has fewer test images than columns
                ax_bar.axis("off")
                for s in ax_img.spines.values():
                    s.set_visible(False)
                continue
            i = indices[c]
            p = scores.probs[i]  # (K,)
            pred, true = int(p.argmax()), int(scores.labels[i])
            ok = pred == true
            ax_img.imshow(scores.images[i])
            for s in ax_img.spines.values():  # the frame is the at-a-glance verdict
                s.set_edgecolor(GREEN if ok else RED)
                s.set_linewidth(3.5)
            mark = "✓" if ok else "✗"
            ax_img.set_title(f"{mark} {_short(scores.classes[pred], 18)} {100 * p[pred]:.0f}%", fontsize=7,
                             color=GREEN if ok else RED)
            top = np.argsort(-p, kind="stable")[:3]
            ys = list(range(len(top)))[::-1]  # most probable on top
            ax_bar.barh(ys, p[top], color=[GREEN if t == true else GREY for t in top], height=0.75, alpha=0.85)
            for y, t in zip(ys, top):  # labels inside the panel, so they never spill into the next cell
                ax_bar.text(0.02, y, f"{_short(scores.classes[t], 18)} {100 * p[t]:.0f}%", va="center", fontsize=6)
            ax_bar.set_xlim(0, 1)
            ax_bar.set_ylim(-0.6, len(top) - 0.4)
            ax_bar.set_xticks([])
            ax_bar.set_yticks([])
            for s in ("top", "right", "left"):
                ax_bar.spines[s].set_visible(False)
            shown.append({"image": str(scores.paths[i]), "true": scores.classes[true], "pred": scores.classes[pred],
                          "confidence": float(p[pred]), "correct": bool(ok)})
    fig.suptitle(f"Test predictions ({pick}, seed {seed}): frame green = correct, red = wrong; bars = top-3 "
                 f"(green = true class)", fontsize=9, y=1 - 0.1 / height)
    fig.savefig(out, dpi=70, bbox_inches="tight")
    plt.close(fig)
    return {"pick": pick, "seed": seed, "images": shown}
