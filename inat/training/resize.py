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

``train.resize_start=auto`` (the default) turns it on where it was measured to pay: the scratch
CNN trained on images, on the CPU, under a time budget (``train.max_minutes`` > 0), starting at
:data:`AUTO_START` px. There the images a minute holds decide the accuracy, and at 1 minute it
gained 1.9 to 5.3 points on three CPU kinds, and 1.0 to 3.0 at 10 minutes, never a loss
(``experiments/bench/time_to_accuracy_*.json``). It stays off on a GPU (the step at the input
size is not what limits such a run, and nothing was measured there), for pretrained backbones
(their features are tuned at their own size) and without a time budget (the epochs decide).
An explicit side (or 0, off) applies wherever it is set.

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


AUTO = "auto"
AUTO_START = 64  # train.resize_start=auto's first side: a 64-px step costs 0.44 of a 96-px one


@dataclass(frozen=True)
class ResizeChoice:
    """The run's progressive resizing, or None, and the sentence that says why (logged and in ``summary.json``)."""

    schedule: "ResizeSchedule | None"
    reason: str

    @property
    def name(self) -> str:
        s = self.schedule
        return "off" if s is None else f"{s.start}->{s.native}px"


def choose(train_cfg, native: int, *, device_type: str, scratch: bool, cached: bool) -> ResizeChoice:
    """The schedule ``train.resize_*`` asks for on this run (see the module's docstring for auto).

    ``scratch``: the model is the scratch CNN; ``cached``: the run trains on cached backbone
    outputs, which have no image to resize (an explicit side is refused there, before any image
    is decoded).
    """
    start = train_cfg.resize_start  # auto | 0 | a side in px (inat.config.config_errors checks which)
    hold, full = train_cfg.resize_hold, train_cfg.resize_full
    if start != AUTO:
        if start == 0 or start == native:
            return ResizeChoice(None, f"off (train.resize_start={start})")
        if cached:
            raise InatError(f"train.resize_start={start} resizes the training images, but this run trains on "
                            f"cached backbone outputs: set train.resize_start=0, or finetune.cached_features=false / "
                            f"finetune.cache_views=0 to train on images.")
        return ResizeChoice(ResizeSchedule(native, start, hold, full),
                            f"train.resize_start={start}: {start} px growing to {native} px by {full:.0%} of the run")
    off = ("this run trains on cached backbone outputs" if cached
           else "a pretrained backbone keeps its input size" if not scratch
           else f"on {device_type} the step at the input size is not what limits a run" if device_type != "cpu"
           else "no time budget (train.max_minutes=0): the epochs decide" if train_cfg.max_minutes == 0
           else f"the input size {native} px is not above {AUTO_START} px" if native <= AUTO_START
           else None)
    if off is not None:
        return ResizeChoice(None, f"off (train.resize_start=auto: {off})")
    return ResizeChoice(ResizeSchedule(native, AUTO_START, hold, full),
                        f"train.resize_start=auto: {AUTO_START} px growing to {native} px by {full:.0%} of the "
                        f"{train_cfg.max_minutes:g}-minute budget (the scratch CNN on the CPU under a time budget; "
                        f"train.resize_start=0 turns it off)")
