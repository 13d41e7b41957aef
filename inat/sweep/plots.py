"""Sweep figures: progress over time and parallel coordinates, as PNG (matplotlib) and plotly.

Plotly figures are returned as HTML fragments; the report embeds plotly.js once, inline, so
the page works offline (no CDN).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

from inat.sweep.analysis import Row, SweepData

STATE_COLORS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "budget": "#7f7f7f", "running": "#2ca02c"}


def progress_series(data: SweepData) -> Tuple[List[Row], List[float], List[float]]:
    """Trained trials by start time, their minutes since the first start, and the running best."""
    rows = sorted((r for r in data.trained if r.started is not None), key=lambda r: r.started)
    if not rows:
        return [], [], []
    t0 = rows[0].started
    minutes = [(r.started - t0).total_seconds() / 60 for r in rows]
    best, running = -1.0, []
    for r in rows:
        if r.state == "complete":  # pruned trials trained less: they cannot set the bar
            best = max(best, r.val_accuracy)
        running.append(best if best >= 0 else float("nan"))
    return rows, minutes, running


def axes_values(data: SweepData) -> Dict[str, Tuple[List[float], List[str] | None]]:
    """Each hyperparameter as numbers for a parallel axis (categories get codes and labels)."""
    rows = data.trained
    out: Dict[str, Tuple[List[float], List[str] | None]] = {}
    for name in data.param_names:
        vals = [r.params.get(name) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[name] = ([float(v) for v in vals], None)
        else:
            labels = sorted({str(v) for v in vals})
            out[name] = ([float(labels.index(str(v))) for v in vals], labels)
    return out


def save_pngs(data: SweepData, sweep_dir: Path) -> Dict[str, str]:
    """Write sweep_progress.png and sweep_parallel.png; returns {figure: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = {}
    rows, minutes, running = progress_series(data)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for state, color in STATE_COLORS.items():
        pts = [(m, 100 * r.val_accuracy) for r, m in zip(rows, minutes) if r.state == state]
        if pts:
            ax.scatter(*zip(*pts), c=color, label=state, s=28, zorder=3)
    if rows:
        ax.step(minutes, [100 * v for v in running], where="post", c="k", lw=1.5, label="running best (complete)")
    ax.set(xlabel="trial start (minutes into the sweep)", ylabel="best val accuracy (%)",
           title=f"{data.sweep_dir.name}: {len(rows)} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_progress.png", dpi=120)
    plt.close(fig)
    files["progress"] = "sweep_progress.png"

    axes = axes_values(data)
    acc = np.array([100 * r.val_accuracy for r in data.trained])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * (len(axes) + 1)), 4.8))
    names = list(axes) + ["val accuracy"]
    cols = [np.array(v) for v, _ in axes.values()] + [acc]
    if len(acc):
        norm = [(c - c.min()) / (c.max() - c.min()) if c.max() > c.min() else c * 0 + 0.5 for c in cols]
        cmap = plt.get_cmap("viridis")
        span = (acc.max() - acc.min()) or 1.0
        for i in np.argsort(acc):  # best trials drawn last, on top
            ax.plot(range(len(names)), [n[i] for n in norm], c=cmap((acc[i] - acc.min()) / span), alpha=0.8, lw=1.2)
        for j, (name, (vals, labels)) in enumerate(list(axes.items())):
            lo, hi = min(vals), max(vals)
            if labels:
                for k, lab in enumerate(labels):
                    ax.text(j, (k - lo) / (hi - lo) if hi > lo else 0.5, lab, fontsize=7, ha="right", va="center")
            else:
                ax.text(j, 0, f"{lo:.3g}", fontsize=7, ha="right")
                ax.text(j, 1, f"{hi:.3g}", fontsize=7, ha="right")
        ax.text(len(names) - 1, 0, f"{acc.min():.1f}%", fontsize=7, ha="right")
        ax.text(len(names) - 1, 1, f"{acc.max():.1f}%", fontsize=7, ha="right")
    for j in range(len(names)):
        ax.axvline(j, c="0.6", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_title("parallel coordinates (colour = val accuracy)")
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_parallel.png", dpi=120)
    plt.close(fig)
    files["parallel"] = "sweep_parallel.png"
    return files


def plotly_fragments(data: SweepData) -> Dict[str, str]:
    """The two interactive figures as HTML fragments; the first carries plotly.js inline."""
    import plotly.graph_objects as go

    rows, minutes, running = progress_series(data)
    progress = go.Figure()
    for state, color in STATE_COLORS.items():
        pts = [(m, r) for r, m in zip(rows, minutes) if r.state == state]
        if pts:
            progress.add_trace(go.Scatter(
                x=[m for m, _ in pts], y=[100 * r.val_accuracy for _, r in pts], mode="markers", name=state,
                marker={"color": color, "size": 9},
                text=[f"trial {r.number}<br>" + "<br>".join(f"{k}={v}" for k, v in r.params.items()) for _, r in pts],
                hovertemplate="%{text}<br>val acc %{y:.1f}%<extra></extra>"))
    progress.add_trace(go.Scatter(x=minutes, y=[100 * v for v in running], mode="lines", name="running best",
                                  line={"shape": "hv", "color": "black"}))
    progress.update_layout(title="val accuracy by trial start", xaxis_title="minutes into the sweep",
                           yaxis_title="best val accuracy (%)", height=420)
    dims = []
    for name, (vals, labels) in axes_values(data).items():
        dim: Dict[str, Any] = {"label": name, "values": vals}
        if labels:
            dim.update(tickvals=list(range(len(labels))), ticktext=labels)
        dims.append(dim)
    acc = [100 * r.val_accuracy for r in data.trained]
    dims.append({"label": "val accuracy (%)", "values": acc})
    parallel = go.Figure(go.Parcoords(line={"color": acc, "colorscale": "Viridis", "showscale": True},
                                      dimensions=dims))
    parallel.update_layout(title="parallel coordinates (drag on an axis to filter)", height=480)
    return {"progress": progress.to_html(full_html=False, include_plotlyjs=True),
            "parallel": parallel.to_html(full_html=False, include_plotlyjs=False)}
