"""Augmentation of whole batches on the training device, with per-sample randomness.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a
batch every image gets the same flip or crop; per-image calls cost a Python loop per
image. Here flips, shifts, random-resized crops, colour jitter and erasing are drawn per
sample and applied with a few tensor ops on the whole batch. MixUp and CutMix are
batch-level by nature and come from torchvision.transforms.v2.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch
import torch.nn.functional as F


class BatchAugment:
    """Callable ``(x uint8 (B,H,W,3), y (B,)) -> (x float (B,3,H,W) normalised, y or soft targets)``."""

    def __init__(self, aug_cfg: Any, mean, std, num_classes: int) -> None:
        self.cfg = aug_cfg
        self.num_classes = num_classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.mix = None
        choices = []
        if aug_cfg.mixup > 0:
            from torchvision.transforms import v2

            choices.append(v2.MixUp(alpha=float(aug_cfg.mixup), num_classes=num_classes))
        if aug_cfg.cutmix > 0:
            from torchvision.transforms import v2

            choices.append(v2.CutMix(alpha=float(aug_cfg.cutmix), num_classes=num_classes))
        if choices:
            from torchvision.transforms import v2

            self.mix = v2.RandomChoice(choices)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.trivial_augment:
            x = _trivial_augment(x, gen)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if cfg.crop_scale < 1.0:
            x = random_resized_crop(x, cfg.crop_scale, cfg.flip, gen)
        else:
            if cfg.shift > 0:
                x = random_shift(x, int(cfg.shift), gen)
            if cfg.flip:
                x = random_flip(x, gen)
        if cfg.color > 0:
            x = color_jitter(x, float(cfg.color), gen)
        if self.mean.device != x.device:  # moved once; later batches find the constants there
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = (x - self.mean) / self.std
        if cfg.erasing > 0:
            x = random_erasing(x, float(cfg.erasing), gen)
        if self.mix is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device)))  # v2 uses the global RNG
            x, y = self.mix(x, y)
        return x, y


def _uniform(n: int, gen: torch.Generator, device) -> torch.Tensor:
    # Drawn on the generator's own device (a CUDA generator for GPU batches: no host round trip).
    return torch.rand(n, generator=gen, device=gen.device).to(device)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    mask = (_uniform(x.shape[0], gen, x.device) < 0.5).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (reflect padding), a per-sample crop."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    out = padded.gather(2, rows)  # (B, C, H, W+2p)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, cols)


def random_resized_crop(x: torch.Tensor, min_scale: float, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of area in [min_scale, 1] and aspect in [3/4, 4/3], resized back.

    One affine grid per sample (scale, translation, optional mirror) and one grid_sample
    call for the whole batch.
    """
    b = x.shape[0]
    area = min_scale + (1 - min_scale) * _uniform(b, gen, x.device)
    log_ratio = (_uniform(b, gen, x.device) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (_uniform(b, gen, x.device) * 2 - 1) * (1 - sw)
    ty = (_uniform(b, gen, x.device) * 2 - 1) * (1 - sh)
    sx = sw
    if flip:
        sx = torch.where(_uniform(b, gen, x.device) < 0.5, -sw, sw)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sh, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors in [1 - s, 1 + s]."""
    b = x.shape[0]

    def factor() -> torch.Tensor:
        return (1 + (_uniform(b, gen, x.device) * 2 - 1) * strength).view(b, 1, 1, 1)

    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * factor() + gray
    return x.clamp_(0, 1)


def random_erasing(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """With probability ``p`` per image, zero a random rectangle of 2-25% of the area."""
    b, _, h, w = x.shape
    apply = _uniform(b, gen, x.device) < p
    area = (0.02 + 0.23 * _uniform(b, gen, x.device)) * h * w
    ratio = torch.exp((_uniform(b, gen, x.device) * 2 - 1) * math.log(3.0))
    eh = torch.sqrt(area * ratio).clamp(1, h).long()
    ew = torch.sqrt(area / ratio).clamp(1, w).long()
    y0 = (_uniform(b, gen, x.device) * (h - eh + 1)).long()
    x0 = (_uniform(b, gen, x.device) * (w - ew + 1)).long()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((rows >= y0.view(b, 1, 1)) & (rows < (y0 + eh).view(b, 1, 1)) &
           (cols >= x0.view(b, 1, 1)) & (cols < (x0 + ew).view(b, 1, 1)) & apply.view(b, 1, 1))
    return x.masked_fill(box.unsqueeze(1), 0.0)


def _trivial_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # TrivialAugment draws one op per image by design, so it runs per sample on uint8 (B,H,W,3).
    from torchvision.transforms import v2

    ta = v2.TrivialAugmentWide()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device)))
    chw = x.permute(0, 3, 1, 2)
    return torch.stack([ta(img) for img in chw]).permute(0, 2, 3, 1)
