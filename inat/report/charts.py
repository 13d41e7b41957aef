"""The report's own small charts (PNG bytes): learning curves, the run comparison, risk-coverage."""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence, Tuple


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def learning_curves(rows: List[Dict], title: str) -> Optional[bytes]:
    """Train/val accuracy and loss per epoch from metrics.csv rows (None when there are none)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.get("epoch") for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, style in (("train_accuracy", "--"), ("val_accuracy", "-")):
        if key in rows[0]:
            a.plot(epochs, [100 * float(r[key]) for r in rows], style, marker="o", ms=3, label=key.replace("_", " "))
    for key, style in (("train_loss", "--"), ("val_loss", "-")):
        if key in rows[0]:
            b.plot(epochs, [float(r[key]) for r in rows], style, marker="o", ms=3, label=key.replace("_", " "))
    a.set_ylabel("accuracy (%)")
    b.set_ylabel("loss")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def compare_runs(names: Sequence[str], val: Sequence[Optional[float]], test: Sequence[Optional[float]],
                 title: str) -> bytes:
    """Grouped bars of best validation and test accuracy (%) per run; missing values are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * n + 2), 3.4))
    xs = range(n)
    for offset, values, label, colour in ((-0.2, val, "best val", "#9ecae1"), (0.2, test, "test", "#3182bd")):
        for x, v in zip(xs, values):
            if v is None:
                continue
            ax.bar(x + offset, 100 * v, width=0.38, color=colour, label=label)
            ax.text(x + offset, 100 * v + 0.5, f"{100 * v:.1f}", ha="center", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def risk_coverage(curves: Dict[str, Dict], marks: Dict[str, Tuple[float, float]], title: str) -> bytes:
    """Precision of the kept images against the share kept (coverage), one line per ``name -> curve``
    (test.json's ``rejection.curve``), with each ``marks[name] = (coverage, precision)`` at the
    validation-chosen threshold as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, curve in curves.items():
        line, = ax.plot([100 * c for c in curve["coverage"]], [100 * p for p in curve["precision"]], label=name)
        if name in marks:
            coverage, precision = marks[name]
            ax.plot([100 * coverage], [100 * precision], "o", color=line.get_color(), ms=6,
                    label=f"{name}: threshold ({100 * coverage:.1f}% kept)")
    ax.set_xlabel("coverage: test images kept (%)")
    ax.set_ylabel("precision of the kept (%)")
    ax.set_xlim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)
