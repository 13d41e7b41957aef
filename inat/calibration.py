"""Can a softmax score be trusted? ECE, NLL, Brier, a reliability diagram, temperature scaling.

All functions take plain tensors: ``probs`` (N, K) rows summing to 1 or ``logits`` (N, K),
and integer ``labels`` (N,). Temperature scaling (Guo et al. 2017) divides the logits by one
scalar T > 0 fitted to minimise NLL on the validation split; it never changes the argmax,
so accuracy is untouched and only the confidence moves. The fit belongs at the end of
training (on val, never on the test folder); its result is stored in the checkpoint under
``TEMPERATURE_KEY`` and read by test, predict and export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE_KEY = "temperature"  # checkpoint key: a float, absent in checkpoints from before calibration
ECE_BINS = 15


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
    """The T > 0 minimising NLL of ``softmax(logits / T)``, by LBFGS on log T (so T stays positive).

    Pass validation logits only. Starts at T = 1; returns 1.0 for an empty set. A single
    convex-in-log-T scalar problem, so LBFGS with a line search converges in a few steps.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


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
