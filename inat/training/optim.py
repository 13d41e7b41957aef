"""Optimizer and learning-rate schedule: AdamW/Adam/SGD with per-group lr, warmup then anneal."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from inat.choices import OPTIMIZERS, SCHEDULES
from inat.errors import InatError
from inat.models.freeze import param_groups


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1]: linear warmup, then the schedule."""
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    if schedule == "constant":
        return 1.0
    p = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    if schedule == "onecycle":  # linear anneal to zero after the warmup ramp
        return max(0.0, 1.0 - p)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise InatError(f"Unknown optim.schedule '{schedule}': valid are {', '.join(SCHEDULES)}.")


def check_schedule(schedule: str) -> None:
    """Refuse an unknown schedule before any training (it used to pass silently at epochs=1)."""
    if schedule not in SCHEDULES:
        raise InatError(f"Unknown optim.schedule '{schedule}': valid are {', '.join(SCHEDULES)}.")


def make_optimizer(model: nn.Module, train_cfg: Any, optim_cfg: Any, finetune_cfg: Any,
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD; no weight decay on biases and norm weights (1-d parameters).

    Each group keeps its own ``base_lr`` (fine-tuning's discriminative rates), which the
    schedule multiplies. On CUDA every optimizer uses its fused kernel: one launch per step,
    and GradScaler's inf check happens inside it instead of as a host sync (with a non-fused
    optimizer ``GradScaler.step`` reads ``found_inf`` with ``.item()`` every step).
    """
    lr, wd = float(train_cfg.lr), float(optim_cfg.weight_decay)
    if finetune_cfg.strategy != "none":
        groups = param_groups(model, finetune_cfg, lr, wd)
    else:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": wd, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    for g in groups:
        g["base_lr"] = g["lr"]
    name = optim_cfg.name
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, **fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(optim_cfg.momentum), nesterov=bool(optim_cfg.nesterov),
                               **fused)
    raise InatError(f"Unknown optim.name '{name}': valid are {', '.join(OPTIMIZERS)}.")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's ``base_lr`` by ``factor`` (keeps the groups' ratios)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
