"""Can a softmax score be trusted? ECE, NLL, Brier, a reliability diagram, temperature scaling.

All functions take plain tensors: ``probs`` (N, K) rows summing to 1 or ``logits`` (N, K),
and integer ``labels`` (N,). Temperature scaling (Guo et al. 2017) divides the logits by one
scalar T > 0 fitted to minimise NLL on the validation split; it never changes the argmax,
so accuracy is untouched and only the confidence moves. The fit belongs at the end of
training (on val, never on the test folder); its result is stored in the checkpoint under
``TEMPERATURE_KEY`` and read by test, predict and export.

Saying "none of my classes": ``risk_coverage`` orders images by calibrated top-1 probability
and gives, for each threshold, the share kept (coverage) and the accuracy of the kept
(precision); ``choose_threshold`` picks, on the validation split, the smallest threshold whose
kept set reaches a target precision. Its record is stored under ``REJECT_THRESHOLD_KEY`` and
``REJECTION_KEY``; predict and detect's namer answer ``unknown`` below it.

Every fit goes through ``choose_temperature``: T is bounded to ``[MIN_TEMPERATURE,
MAX_TEMPERATURE]``, and a split of fewer than ``MIN_CALIBRATION_IMAGES`` images, or a fit that
does not lower the validation NLL, keeps the raw softmax (T = None, with a note saying why).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

# Checkpoint keys. TEMPERATURE_KEY: a float > 0; None when training kept the raw softmax (then
# TEMPERATURE_NOTE_KEY says why); absent in checkpoints from before calibration.
TEMPERATURE_KEY = "temperature"
TEMPERATURE_NOTE_KEY = "temperature_note"
ECE_BINS = 15
# The range a fitted T may take. Outside it the scaled softmax is degenerate rather than
# calibrated: T = 20 already squeezes a logit gap of 10 into a probability ratio of 1.65, and
# T = 0.05 turns a gap of 1 into a ratio of about 5e8. A fit that wants more is pinned here.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
# The smallest validation split T is fitted on. The NLL optimum is set by the images the model
# gets wrong or barely right, and a tiny split holds a handful of them: every one right drives
# T to 0, one confident mistake to infinity (1 image gave T = 759,314, 6 images T = 2,112).
# 20 is the smallest split in which a 10% error rate still shows at least two mistakes, so no
# single image decides T; real runs validate on hundreds of images and are far above it.
MIN_CALIBRATION_IMAGES = 20
# Checkpoint and summary.json keys of the rejection threshold: REJECT_THRESHOLD_KEY a float in
# (0, 1] or None (no threshold reached the target; REJECTION_KEY's note says so); REJECTION_KEY
# the whole record. Both absent in checkpoints from before rejection.
REJECT_THRESHOLD_KEY = "reject_threshold"
REJECTION_KEY = "rejection"
CURVE_POINTS = 100  # the most (coverage, precision) points a stored curve keeps


def _as_tensors(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(probs), dtype=torch.float64), torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _bins(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: (count, mean confidence, accuracy); empty bins hold 0."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    # A confidence of exactly 1.0 belongs to the last bin, not one past it.
    index = (conf * bins).long().clamp(max=bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp(min=1)
    return count, conf_sum / safe, acc_sum / safe


def ece(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - confidence|
    weighted by the bin's share of samples (top-1 confidence, ``bins`` bins on [0, 1])."""
    p, y = _as_tensors(probs, labels)
    if len(y) == 0:
        return 0.0
    count, conf, acc = _bins(p, y, bins)
    return float((count / count.sum() * (acc - conf).abs()).sum())


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true class (natural log); probabilities floored at 1e-12."""
    p, y = _as_tensors(probs, labels)
    return float(-p.gather(1, y[:, None]).clamp(min=1e-12).log().mean())


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over samples of the squared distance to the one-hot label (0 best, 2 worst)."""
    p, y = _as_tensors(probs, labels)
    return float(((p - F.one_hot(y, p.shape[1]).double()) ** 2).sum(1).mean())


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """The T in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` minimising NLL of ``softmax(logits / T)``.

    LBFGS on log T, clamped to the bounds inside the loss, so the search never evaluates an
    overflowing T and stops at a bound when the optimum lies beyond it. NLL is convex in 1/T,
    so the clamped optimum is the constrained one. Pass validation logits only, and use
    ``choose_temperature``, which decides whether the fit is trusted; returns 1.0 for an empty set.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 1.0
    bounds = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(*bounds).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    fitted = float(log_t.detach().clamp(*bounds).exp())
    return fitted if math.isfinite(fitted) else 1.0  # a NaN logit makes the search NaN: no T, not NaN


@dataclass(frozen=True)
class TemperatureChoice:
    """What calibration decided: ``temperature`` (None = keep the raw softmax) and the one line saying so."""

    temperature: Optional[float]
    note: str


def choose_temperature(logits: Any, labels: Any) -> TemperatureChoice:
    """The rule every caller fits T by (training's end, test mode's fallback on val).

    Fewer than ``MIN_CALIBRATION_IMAGES`` images, or a fitted T whose validation NLL is not
    below the raw softmax's, keeps the raw softmax; otherwise T from ``fit_temperature``
    (bounded), rounded to 6 digits as the checkpoint stores it.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(y)
    if n < MIN_CALIBRATION_IMAGES:
        return TemperatureChoice(None, f"temperature not fitted on {n} validation images (fewer than "
                                       f"{MIN_CALIBRATION_IMAGES}); probabilities stay the raw softmax")
    t = round(fit_temperature(z, y), 6)
    before, after = float(F.cross_entropy(z, y)), float(F.cross_entropy(z / t, y))
    if not after < before:
        return TemperatureChoice(None, f"temperature not fitted: T = {t:.3f} did not lower the validation NLL "
                                       f"({before:.4f} on {n} images); probabilities stay the raw softmax")
    pinned = " (pinned at the bound of its range)" if t in (MIN_TEMPERATURE, MAX_TEMPERATURE) else ""
    return TemperatureChoice(t, f"temperature {t:.3f}{pinned} fitted on {n} validation images (validation NLL "
                                f"{before:.3f} -> {after:.3f}; calibrated probabilities)")


def temperature_record(choice: Optional[TemperatureChoice]) -> Dict[str, Any]:
    """The keys a checkpoint and ``summary.json`` record for ``choice`` (None: nothing was fitted)."""
    if choice is None:
        return {TEMPERATURE_KEY: None}
    return {TEMPERATURE_KEY: choice.temperature, TEMPERATURE_NOTE_KEY: choice.note}


def temperature_problem(value: Any) -> Optional[str]:
    """Why a stored temperature cannot divide logits (a phrase), or None when it can or is None."""
    if value is None:
        return None
    # bool is an int to Python, but True as a temperature is a corrupted field, not T = 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        return f"temperature {value!r}, which is not a finite number > 0"
    return None


def apply_temperature(logits: torch.Tensor, temperature: Optional[float]) -> torch.Tensor:
    """``logits / T``; unchanged when ``temperature`` is None (uncalibrated checkpoint or raw logits asked for)."""
    return logits if temperature is None else logits / float(temperature)


def rescale_probs(probs: np.ndarray, temperature: Optional[float]) -> np.ndarray:
    """``softmax(logits / T)`` from ``softmax(logits)``: log-probabilities are the logits up to a
    per-row constant, which softmax ignores, so no second forward pass is needed."""
    if temperature is None:
        return probs
    log_p = np.log(np.clip(probs.astype(np.float64), 1e-300, None))
    return torch.as_tensor(log_p / float(temperature)).softmax(1).numpy().astype(probs.dtype)


def checkpoint_temperature(state: Dict[str, Any], calibrated: bool = True) -> Optional[float]:
    """The checkpoint's fitted temperature when ``calibrated`` and present, else None (raw logits)."""
    value = state.get(TEMPERATURE_KEY) if calibrated else None
    return None if value is None else float(value)


def calibration_metrics(logits: torch.Tensor, labels: Any, temperature: Optional[float] = None,
                        bins: int = ECE_BINS) -> Dict[str, float]:
    """``{ece, nll, brier}`` of ``softmax(logits / T)`` (T = 1 when None), as plain floats."""
    probs = apply_temperature(torch.as_tensor(logits).double(), temperature).softmax(1)
    return {"ece": ece(probs, labels, bins), "nll": nll(probs, labels), "brier": brier(probs, labels)}


def reliability_diagram(curves: Dict[str, Any], labels: Any, out: Path, bins: int = ECE_BINS,
                        title: str = "Reliability") -> Path:
    """Write a reliability diagram to ``out``: per-bin accuracy against confidence for each
    ``name -> probs (N, K)`` in ``curves`` (e.g. before and after temperature scaling), the
    diagonal as the perfectly calibrated reference, ECE in the legend, and a bin-count strip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.6, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centres = (np.arange(bins) + 0.5) / bins
    ax.plot([0, 1], [0, 1], color="#9e9e9e", linestyle="--", linewidth=1, label="perfect")
    for i, (name, probs) in enumerate(curves.items()):
        p, y = _as_tensors(probs, labels)
        count, conf, acc = _bins(p, y, bins)
        keep = (count > 0).numpy()
        ax.plot(conf.numpy()[keep], acc.numpy()[keep], marker="o", markersize=3,
                label=f"{name} (ECE {100 * ece(p, y, bins):.1f}%)")
        ax_n.bar(centres + (i - 0.5) * 0.4 / bins, count.numpy(), width=0.4 / bins, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax_n.set_xlabel(f"confidence (top-1, {bins} bins)")
    ax_n.set_ylabel("images")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _kept_groups(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct top-1 probability t, highest first: (t, images with confidence >= t, right among them)."""
    p, y = _as_tensors(probs, labels)
    if len(y) == 0:
        return np.zeros(0), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    conf, pred = p.max(1)
    order = np.argsort(-conf.numpy(), kind="stable")
    conf, right = conf.numpy()[order], (pred == y).numpy()[order]
    # The last image of each run of equal confidences closes a group: ties are kept or dropped together.
    last = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))
    return conf[last], last + 1, np.cumsum(right)[last]


def risk_coverage(probs: Any, labels: Any, points: int = CURVE_POINTS) -> Dict[str, Any]:
    """The risk-coverage curve of top-1 confidence: keep the images whose top-1 probability is at
    least a threshold, for every threshold the images offer.

    Returns ``{n, threshold, coverage, precision, aurc}``: the three lists run from the highest
    threshold to the lowest (coverage rising to 1), thinned to at most ``points`` evenly spaced
    thresholds (the first and last always kept); ``coverage`` is the share of images kept,
    ``precision`` the accuracy of the kept. ``aurc`` is the area under the risk (1 - precision)
    against coverage, from every threshold (not the thinned ones): the mean risk over the
    coverages, 0 when every kept set is right. Images of equal confidence are kept together.
    """
    threshold, kept, right = _kept_groups(probs, labels)
    n = int(kept[-1]) if len(kept) else 0
    if n == 0:
        return {"n": 0, "threshold": [], "coverage": [], "precision": [], "aurc": None}
    coverage, precision = kept / n, right / kept
    aurc = float(np.sum(np.diff(np.concatenate([[0.0], coverage])) * (1.0 - precision)))
    shown = np.unique(np.linspace(0, len(kept) - 1, min(len(kept), max(2, points))).round().astype(int))
    return {"n": n, "threshold": [round(float(v), 6) for v in threshold[shown]],
            "coverage": [round(float(v), 6) for v in coverage[shown]],
            "precision": [round(float(v), 6) for v in precision[shown]], "aurc": round(aurc, 6)}


@dataclass(frozen=True)
class ThresholdChoice:
    """What ``choose_threshold`` decided: the threshold (None = none reaches the target) and its numbers on the split."""

    target_precision: float
    threshold: Optional[float]
    coverage: Optional[float]  # share of the split kept at the threshold
    precision: Optional[float]  # accuracy of the kept
    n: int
    note: str


def choose_threshold(probs: Any, labels: Any, target_precision: float) -> ThresholdChoice:
    """The smallest top-1 probability threshold whose kept set (confidence >= threshold) is at
    least ``target_precision`` accurate on these images (the validation split), with the
    coverage it gives; the largest coverage that reaches the target, since precision need not
    rise with the threshold. None, with a note saying why, when no threshold reaches it (the note
    names the best precision seen) or the split has fewer than ``MIN_CALIBRATION_IMAGES`` images.
    """
    threshold, kept, right = _kept_groups(probs, labels)
    target = float(target_precision)
    n = int(kept[-1]) if len(kept) else 0
    if n < MIN_CALIBRATION_IMAGES:
        # A precision is a share of the kept: on a handful of images one mistake moves it by tens of points.
        return ThresholdChoice(target, None, None, None, n, f"no rejection threshold: {n} validation images are fewer "
                                                            f"than {MIN_CALIBRATION_IMAGES}, too few to measure a precision")
    precision = right / kept
    reached = np.flatnonzero(precision >= target)
    if not len(reached):
        best = int(np.argmax(precision))
        return ThresholdChoice(target, None, None, None, n,
                               f"no rejection threshold: no threshold reaches precision {target:.3f} on the {n} "
                               f"validation images (the best is {precision[best]:.3f}, keeping {kept[best]})")
    i = int(reached[-1])
    coverage = float(kept[i] / n)
    return ThresholdChoice(target, float(threshold[i]), coverage, float(precision[i]), n,
                           f"reject threshold {threshold[i]:.4f}: precision {precision[i]:.3f} (target {target:.3f}) "
                           f"keeping {kept[i]} of {n} validation images ({coverage:.1%})")


def coverage_at(probs: Any, labels: Any, threshold: float) -> tuple[float, Optional[float]]:
    """``(coverage, precision)`` of keeping the images whose top-1 probability is at least
    ``threshold``: the share kept and their accuracy (None when nothing is kept)."""
    p, y = _as_tensors(probs, labels)
    if len(y) == 0:
        return 0.0, None
    conf, pred = p.max(1)
    kept = conf >= float(threshold)
    return float(kept.double().mean()), (float((pred[kept] == y[kept]).double().mean()) if kept.any() else None)


def threshold_record(choice: Optional[ThresholdChoice], **facts: Any) -> Dict[str, Any]:
    """The keys a checkpoint and ``summary.json`` record for ``choice`` (None: nothing was chosen).

    ``facts`` (how the probabilities were made: ``temperature``, ``tta_flip``) join the record.
    """
    if choice is None:
        return {REJECT_THRESHOLD_KEY: None}
    record = {"target_precision": choice.target_precision, "threshold": choice.threshold,
              "val_coverage": choice.coverage, "val_precision": choice.precision, "n_val": choice.n,
              "note": choice.note, **facts}
    return {REJECT_THRESHOLD_KEY: choice.threshold, REJECTION_KEY: record}


def checkpoint_threshold(state: Dict[str, Any]) -> Optional[float]:
    """The checkpoint's rejection threshold, or None (none reached the target, or an older checkpoint)."""
    value = state.get(REJECT_THRESHOLD_KEY)
    return None if value is None else float(value)
