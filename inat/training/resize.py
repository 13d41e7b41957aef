"""Progressive resizing: the early steps of a run train on smaller images.

A 5-block CNN's step costs about the square of the image side, so a step at 64 px costs
0.44 of one at 96 px. ``train.resize_start`` (px) sets the first side: the run holds it for
the first ``train.resize_hold`` of its progress, grows linearly to the model's input size by
``train.resize_full``, and trains the rest at the input size, so BatchNorm statistics and the
dense layer end adapted to the size validation, test and predict use (the FixRes observation:
a network trained lower and tested at its own size loses little). Progress is the schedule's
(``inat.training.loop.Budget.progress``: steps, or training time under a budget), so the sizes
follow the time budget the same way the learning rate does.

The batch is augmented at the cached size and then downsampled with antialiasing (the crop and
flip are the same; only the resolution changes). Sides are multiples of :data:`SIDE_STEP`, so
a run sees a few shapes (cuDNN autotunes and ``torch.compile`` specialises per shape). Models
accept any side: the scratch CNN adapts its last map to the native one before the dense layer
(``ScratchCNN.forward``), the pretrained backbones pool globally.

Why hand-written: timm and torchvision have no schedule of training sizes; Composer's
``ProgressiveResizing`` is the same idea (initial scale, delay, fine-tune fraction) but is a
callback of its own trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inat.errors import InatError

SIDE_STEP = 16  # sides are multiples of this: 64, 80, 96 for a run from 64 to 96 px
MIN_SIDE = 32  # five 2x2 poolings need at least 32 px


@dataclass(frozen=True)
class ResizeSchedule:
    """The training side at each point of a run's progress in [0, 1]."""

    native: int  # the model's input size: validation, test and the end of training use it
    start: int  # the first side, <= native
    hold: float  # progress until which ``start`` is used
    full: float  # progress from which ``native`` is used

    def __post_init__(self) -> None:
        if not MIN_SIDE <= self.start <= self.native:
            raise InatError(f"train.resize_start={self.start} must be between {MIN_SIDE} and the input size "
                            f"{self.native} px (or 0 to train at the input size throughout).")
        if not 0.0 <= self.hold <= self.full <= 1.0:
            raise InatError(f"train.resize_hold={self.hold} and train.resize_full={self.full} must satisfy "
                            f"0 <= resize_hold <= resize_full <= 1.")

    def side(self, progress: float) -> int:
        if progress >= self.full:
            return self.native
        if progress <= self.hold:
            t = 0.0
        else:
            t = (progress - self.hold) / (self.full - self.hold)
        side = self.start + t * (self.native - self.start)
        return min(self.native, max(MIN_SIDE, int(side) // SIDE_STEP * SIDE_STEP))

    def __call__(self, x: torch.Tensor, progress: float) -> torch.Tensor:
        """``x`` (B, 3, S, S) at ``side(progress)``; the same tensor at the native side."""
        side = self.side(progress)
        if side == x.shape[-1] and side == x.shape[-2]:
            return x
        out = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def schedule_from(train_cfg, native: int) -> "ResizeSchedule | None":
    """The run's schedule from ``train.resize_*``; None when ``train.resize_start`` is 0 (off)."""
    start = train_cfg.resize_start  # the schema types the three keys (inat.config.TrainConfig)
    if start == 0 or start == native:
        return None
    return ResizeSchedule(native, start, train_cfg.resize_hold, train_cfg.resize_full)
