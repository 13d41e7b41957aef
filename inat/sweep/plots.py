"""Sweep figures: accuracy vs trial start and parallel coordinates, as PNG (matplotlib) and plotly.

Plotly figures are returned as HTML fragments; the report embeds plotly.js once, inline, so
the page works offline (no CDN). Both kinds share the axis logic here: a pause between
sittings of a sweep is cut out of the time axis and marked, and parameters sampled on a log
scale (learning rate, weight decay) get log axes with labelled levels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from inat.run_folder import SWEEP_PARALLEL_PNG, SWEEP_PROGRESS_PNG
from inat.sweep.analysis import Row, SweepData

STATE_COLORS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "budget": "#7f7f7f", "running": "#2ca02c"}
# A start-to-start interval this much longer than the typical one (and at least MIN_GAP
# minutes) is a pause between sittings, not sweep time: it is cut out of the axis and marked.
GAP_FACTOR = 10.0
MIN_GAP = 10.0
MAX_LOG_TICKS = 5  # labels on a log axis (more overlap on a 5-inch-high figure)


@dataclass
class Gap:
    """A pause cut out of the time axis: where it sits on the drawn axis and how long it was."""

    at: float  # drawn minutes where the later sitting starts
    minutes: float  # real length of the pause


@dataclass
class Axis:
    """One parallel-coordinates axis: plotted values, labelled ticks, and whether it is log10."""

    name: str
    values: List[float]
    tickvals: List[float]
    ticktext: List[str]
    log: bool = False


def progress_series(data: SweepData) -> Tuple[List[Row], List[float], List[float]]:
    """Trained trials by start time, their real minutes since the first start, and the running best."""
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


def cut_gaps(minutes: List[float]) -> Tuple[List[float], List[Gap]]:
    """Minutes with each pause between sittings replaced by one typical interval, and the pauses.

    A stretched axis hides the sweep's own pace (the committed sweep has a 110-minute pause
    between its two sittings); cutting and labelling the pause shows both.
    """
    steps = [b - a for a, b in zip(minutes, minutes[1:])]
    if not steps:
        return list(minutes), []
    typical = sorted(steps)[len(steps) // 2]
    drawn, gaps, removed = [minutes[0]], [], 0.0
    for i, step in enumerate(steps):
        if step > max(MIN_GAP, GAP_FACTOR * typical):
            removed += step - typical
            gaps.append(Gap(minutes[i + 1] - removed, step))
        drawn.append(minutes[i + 1] - removed)
    return drawn, gaps


def _log_space(name: str, space: Dict[str, Any]) -> Optional[bool]:
    """True/False when the recorded search space says how ``name`` was sampled, else None."""
    spec = str(space.get(name, ""))
    if not spec:
        return None
    return "log" in spec


def _log_ticks(lo: float, hi: float, most: int = MAX_LOG_TICKS) -> List[float]:
    """At most ``most`` ticks in [lo, hi] on a log axis: decades when 3 or more fit (every
    other one past ``most``), else 1-3 or 1-2-5 steps, whichever first gives 3 ticks.

    The 1-2-5 steps on every decade put a dozen labels on a 4-decade weight-decay axis.
    """
    exponents = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1,), (1, 3), (1, 2, 5)):
        ticks = [m * 10 ** e for e in exponents for m in mantissas if lo <= m * 10 ** e <= hi]
        if len(ticks) > most:
            ticks = ticks[::math.ceil(len(ticks) / most)]
        if len(ticks) >= 3:
            return ticks
    return [lo, hi]


def _nice_ticks(lo: float, hi: float, log: bool) -> List[float]:
    """Tick positions for a numeric axis: a few round values on a log axis, 5 even steps else."""
    return _log_ticks(lo, hi) if log else [lo + (hi - lo) * i / 4 for i in range(5)]


def tick_label(value: float) -> str:
    """A plain number with up to 3 significant digits: 0.0001, not 1e-04."""
    return np.format_float_positional(value, precision=3, unique=False, fractional=False, trim="-")


def axes_values(data: SweepData) -> List[Axis]:
    """Each hyperparameter as a parallel axis: categories coded with their labels, numbers with
    their levels labelled, log-sampled ones (recorded as ``tag(log, ...)``, or positive and
    spanning two decades) on log10."""
    rows = data.trained
    space = data.info.get("params") or {}
    out: List[Axis] = []
    for name in data.param_names:
        vals = [r.params.get(name) for r in rows]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            nums = [float(v) for v in vals]
            lo, hi = min(nums), max(nums)
            declared = _log_space(name, space)
            log = lo > 0 and (declared if declared is not None else hi / lo >= 100)
            levels = sorted(set(nums))
            ticks = levels if len(levels) <= 6 else _nice_ticks(lo, hi, log)
            if log:
                out.append(Axis(name, [math.log10(v) for v in nums], [math.log10(t) for t in ticks],
                                [tick_label(t) for t in ticks], True))
            else:
                out.append(Axis(name, nums, ticks, [tick_label(t) for t in ticks]))
        else:
            labels = sorted({str(v) for v in vals})
            out.append(Axis(name, [float(labels.index(str(v))) for v in vals], [float(i) for i in range(len(labels))],
                            labels))
    return out


def progress_figure(data: SweepData) -> Any:
    """Matplotlib figure: each trial's best val accuracy at its start, pauses cut out and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, minutes, running = progress_series(data)
    drawn, gaps = cut_gaps(minutes)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for state, color in STATE_COLORS.items():
        pts = [(m, 100 * r.val_accuracy) for r, m in zip(rows, drawn) if r.state == state]
        if pts:
            ax.scatter(*zip(*pts), c=color, label=state, s=28, zorder=3)
    if rows:
        ax.step(drawn, [100 * v for v in running], where="post", c="k", lw=1.5, label="running best (complete)")
    for g in gaps:
        ax.axvline(g.at, c="0.4", ls="--", lw=1)
        ax.annotate(f"pause {g.minutes:.0f} min\n(cut out)", (g.at, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", fontsize=7, va="top")
    cut = f", {len(gaps)} pause(s) between sittings cut out" if gaps else ""
    ax.set(xlabel=f"trial start (minutes of sweep time{cut})", ylabel="best val accuracy (%)",
           title=f"{data.sweep_dir.name}: {len(rows)} trials by start time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def parallel_figure(data: SweepData) -> Any:
    """Matplotlib parallel coordinates: every axis's levels labelled, log axes, a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = axes_values(data)
    acc = np.array([100 * r.val_accuracy for r in data.trained])
    fig, ax = plt.subplots(figsize=(max(9, 1.2 * (len(axes) + 1)), 5.2))
    names = [a.name + (" (log)" if a.log else "") for a in axes]
    if len(acc):
        bounds = []
        for a in axes:
            lo, hi = min(a.values + a.tickvals), max(a.values + a.tickvals)
            bounds.append((lo, hi))
        scale = lambda v, lo, hi: (v - lo) / (hi - lo) if hi > lo else 0.5  # noqa: E731
        cmap = plt.get_cmap("viridis")
        norm = matplotlib.colors.Normalize(acc.min(), acc.max() if acc.max() > acc.min() else acc.min() + 1)
        for i in np.argsort(acc):  # best trials drawn last, on top
            ax.plot(range(len(axes)), [scale(a.values[i], *b) for a, b in zip(axes, bounds)], c=cmap(norm(acc[i])),
                    alpha=0.6, lw=1.0)
        for j, (a, b) in enumerate(zip(axes, bounds)):
            for tv, text in zip(a.tickvals, a.ticktext):
                ax.text(j - 0.03, scale(tv, *b), text, fontsize=7, ha="right", va="center",
                        bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 0.5})
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
        bar.set_label("best val accuracy (%)")
    for j in range(len(axes)):
        ax.axvline(j, c="0.6", lw=0.8)
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.6, max(0.5, len(axes) - 0.6))
    ax.set_title(f"{data.sweep_dir.name}: parallel coordinates, one line per trained trial")
    fig.tight_layout()
    return fig


def save_pngs(data: SweepData, sweep_dir: Path) -> Dict[str, str]:
    """Write sweep_progress.png and sweep_parallel.png; returns {figure: file name}."""
    import matplotlib.pyplot as plt

    files = {}
    for key, make, name in (("progress", progress_figure, SWEEP_PROGRESS_PNG),
                            ("parallel", parallel_figure, SWEEP_PARALLEL_PNG)):
        fig = make(data)
        fig.savefig(sweep_dir / name, dpi=120)
        plt.close(fig)
        files[key] = name
    return files


def plotly_fragments(data: SweepData, include_plotlyjs: bool = True) -> Dict[str, str]:
    """The two interactive figures as HTML fragments; the first carries plotly.js inline unless told not to."""
    import plotly.graph_objects as go

    rows, minutes, running = progress_series(data)
    drawn, gaps = cut_gaps(minutes)
    progress = go.Figure()
    for state, color in STATE_COLORS.items():
        pts = [(m, r) for r, m in zip(rows, drawn) if r.state == state]
        if pts:
            progress.add_trace(go.Scatter(
                x=[m for m, _ in pts], y=[100 * r.val_accuracy for _, r in pts], mode="markers", name=state,
                marker={"color": color, "size": 7},
                text=[f"trial {r.number}<br>" + "<br>".join(f"{k}={v}" for k, v in r.params.items()) for _, r in pts],
                hovertemplate="%{text}<br>val acc %{y:.1f}%<extra></extra>"))
    progress.add_trace(go.Scatter(x=drawn, y=[100 * v for v in running], mode="lines", name="running best",
                                  line={"shape": "hv", "color": "black"}))
    for g in gaps:
        progress.add_vline(x=g.at, line_dash="dash", line_color="gray",
                           annotation_text=f"pause {g.minutes:.0f} min (cut out)", annotation_position="top left")
    progress.update_layout(title="val accuracy by trial start", yaxis_title="best val accuracy (%)", height=420,
                           xaxis_title="minutes of sweep time" + (" (pauses between sittings cut out)" if gaps else ""))
    dims = [{"label": a.name + (" (log)" if a.log else ""), "values": a.values, "tickvals": a.tickvals,
             "ticktext": a.ticktext} for a in axes_values(data)]
    acc = [100 * r.val_accuracy for r in data.trained]
    dims.append({"label": "val accuracy (%)", "values": acc})
    parallel = go.Figure(go.Parcoords(
        line={"color": acc, "colorscale": "Viridis", "showscale": True, "colorbar": {"title": "val acc (%)"}},
        dimensions=dims, labelangle=-25, labelside="bottom"))  # a dozen long names would overlap when flat
    parallel.update_layout(title="parallel coordinates (drag on an axis to filter)", height=520,
                           margin={"b": 120})
    return {"progress": progress.to_html(full_html=False, include_plotlyjs=include_plotlyjs),
            "parallel": parallel.to_html(full_html=False, include_plotlyjs=False)}
