"""The learning-rate range test (``+mode=lr_find``): which ``train.lr`` to train with.

Smith's range test (2017; fastai's ``lr_find``): train the composed model on the train
split for at most one epoch while the learning rate grows exponentially from
``lr_find.start_lr`` to ``lr_find.end_lr``, record the loss of every batch, and stop once its
bias-corrected EMA exceeds ``lr_find.diverge`` times its minimum. The curve the rules read
is smoothed forwards and then backwards (zero phase): a one-way EMA lags by about
``1 / (1 - smoothing)`` steps, which on a short ramp shifts every feature a decade or more
to the right. Two rules read a suggestion off the curve (``lr_find.rule`` picks the one used):

- ``steepest``: the lr where the smoothed loss falls fastest per decade of lr
  (the most negative d loss / d log10 lr), before the minimum;
- ``min_over_10``: a tenth of the lr at the smoothed loss's minimum, since by the minimum
  the steps are already too large to keep descending.

The ramp sets every optimizer param group's lr to its ``base_lr`` (what ``make_optimizer``
gives it at ``train.lr``) times ``ramp / train.lr``, so a fine-tuned model's discriminative
ratios between groups are kept and the suggestion is a ``train.lr`` like any other. Only
``train/`` is read (the validation part is left alone too); nothing is saved but
``lr_find.json``, ``lr_find.png`` and the printed command.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from inat.config import LR_FIND_MIN_STEPS as MIN_STEPS
from inat.config import LR_FIND_RULES as RULES
from inat.data.augment import BatchAugment
from inat.errors import InatError
from inat.inference import process_precision
from inat.models.freeze import set_train_mode
from inat.run_folder import LR_FIND
from inat.runs import write_json
from inat.training.build import build_trainable, open_device
from inat.training.data import SEED_AUG, SEED_ORDER


def ramp(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """(steps,) learning rates growing geometrically from ``start_lr`` to ``end_lr``."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(1, steps - 1))


def smooth(losses: Sequence[float], beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (the first values are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out)


def smooth_zero_phase(losses: Sequence[float], beta: float) -> np.ndarray:
    """``smooth`` forwards, then backwards over the result: the same smoothing without the lag."""
    return smooth(smooth(losses, beta)[::-1], beta)[::-1].copy()


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> Dict[str, Optional[float]]:
    """Both rules' suggestions for a recorded curve; None where the curve cannot answer."""
    if len(lrs) < 3:
        return {name: None for name in RULES}
    low = int(np.argmin(smoothed))
    out: Dict[str, Optional[float]] = {"min_over_10": float(lrs[low] / 10)}
    # The first points are the EMA still settling; skip a tenth of the curve before the minimum.
    skip = max(1, low // 10)
    if low - skip >= 2:
        slope = np.gradient(smoothed[:low + 1], np.log10(lrs[:low + 1]))
        out["steepest"] = float(lrs[skip + int(np.argmin(slope[skip:low + 1]))])
    else:
        out["steepest"] = None
    return out


def find_lr(cfg: Any, out_dir: Path, progress: bool = True, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Run the range test for the composed ``cfg``; writes lr_find.json and lr_find.png into ``out_dir``.

    ``overrides`` are the command's own (``model=... finetune=...``); the suggested training
    command repeats them.
    """
    lf = cfg.lr_find  # its ranges, the rule and start_lr < end_lr were checked with the config
    device = open_device(cfg.train.threads)
    # The model, data and optimizer a training run builds (build.build_trainable), without its run folder's files.
    trainable = build_trainable(cfg, device, progress=progress)
    model, data, optimizer, spec = trainable.model, trainable.data, trainable.optimizer, trainable.model.spec
    set_train_mode(model, cfg.finetune)  # model.train(), BatchNorm of frozen groups kept in eval mode
    policy = process_precision(cfg.train.precision, device)
    reference = cfg.train.lr
    bs = cfg.train.batch_size
    steps = min(lf.steps, len(data.train_idx) // bs)  # at most one epoch, whole batches
    if steps < MIN_STEPS:
        raise InatError(f"lr_find needs at least {MIN_STEPS} batches of train.batch_size={bs} from the train split "
                        f"({len(data.train_idx)} images give {steps}); use a smaller train.batch_size.")
    augment = BatchAugment(cfg.aug, spec.mean, spec.std, spec.num_classes)
    order = torch.Generator().manual_seed(cfg.seed * 1000 + SEED_ORDER)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + SEED_AUG)  # on the batch's device, as training
    perm = data.train_idx[torch.randperm(len(data.train_idx), generator=order).numpy()]
    lrs = ramp(lf.start_lr, lf.end_lr, steps)
    losses: List[float] = []
    stop = "ramp finished"
    for step, lr in enumerate(lrs):
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr / reference  # each group keeps its ratio to train.lr
        idx = np.sort(perm[step * bs:(step + 1) * bs])
        x, target = augment(torch.from_numpy(np.array(data.images[idx])).to(device),
                            torch.from_numpy(data.labels[idx]).to(device), gen)
        if trainable.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with policy.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))  # one host sync per step: the curve is the product here
        smoothed = smooth(losses, lf.smoothing)
        if not math.isfinite(losses[-1]) or (step >= MIN_STEPS and smoothed[-1] > lf.diverge * smoothed.min()):
            stop = "loss diverged"
            break
    n = len(losses)
    lrs, losses_arr = lrs[:n], np.asarray(losses)
    finite = np.isfinite(losses_arr)
    smoothed = smooth_zero_phase(losses_arr[finite], lf.smoothing)
    candidates = suggest(lrs[finite], smoothed)
    suggestion = candidates[lf.rule]
    if suggestion is None:
        raise InatError(f"The loss never fell between lr {lf.start_lr:g} and {lrs[-1]:.3g}, so the "
                        f"'{lf.rule}' rule has no answer; lower lr_find.start_lr or raise lr_find.end_lr.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "suggestion": suggestion, "rule": lf.rule, "rule_says": RULES[lf.rule], "candidates": candidates,
        "command": suggested_command(suggestion, overrides), "stop": stop, "steps": n,
        "epoch_fraction": round(n * bs / len(data.train_idx), 4), "batch_size": bs, "model": spec.name,
        "finetune": cfg.finetune.strategy, "train_lr": reference,
        "group_lr_ratios": [round(g["base_lr"] / reference, 6) for g in optimizer.param_groups],
        "lr": lrs[finite].tolist(), "loss": losses_arr[finite].tolist(), "smoothed_loss": smoothed.tolist(),
        "figure": "lr_find.png",
    }

    write_json(out_dir / LR_FIND, result)
    plot_lr_find(result, out_dir / "lr_find.png")
    return result


def suggested_command(lr: float, overrides: Sequence[str] = ()) -> str:
    """``python run.py <the command's overrides> train.lr=LR``, without the lr_find ones."""
    kept = [o for o in overrides if not o.startswith(("+mode=", "mode=", "lr_find.", "train.lr=", "hydra.run.dir="))]
    return " ".join(["python run.py", *kept, f"train.lr={lr:.2g}"])


def plot_lr_find(result: Dict[str, Any], out: Path) -> Path:
    """Loss and smoothed loss against lr (log axis), both rules' suggestions marked, the chosen one bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(result["lr"], result["loss"], color="#bdbdbd", linewidth=0.8, label="batch loss")
    ax.plot(result["lr"], result["smoothed_loss"], color="#2b83ba", linewidth=1.6, label="smoothed")
    for name, lr in result["candidates"].items():
        if lr is not None:
            chosen = name == result["rule"]
            ax.axvline(lr, color="#d7191c" if chosen else "#fdae61", linewidth=1.6 if chosen else 1.0,
                       linestyle="-" if chosen else "--", label=f"{name}: {lr:.2g}" + (" (suggested)" if chosen else ""))
    ax.set_xscale("log")
    top = max(result["smoothed_loss"][:max(1, len(result["smoothed_loss"]) // 10)] + [min(result["smoothed_loss"])])
    ax.set_ylim(min(result["smoothed_loss"]) * 0.9, top * 1.6)
    ax.set_xlabel(f"learning rate (train.lr; {result['steps']} batches, {result['epoch_fraction']:.0%} of an epoch)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['model']} (finetune={result['finetune']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
