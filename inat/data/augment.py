"""Augmentation of whole batches on the training device, with per-sample randomness.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a
batch every image gets the same flip or crop; per-image calls cost a Python loop per
image. Here flips, shifts, random-resized crops, colour jitter and erasing are drawn per
sample and applied with a few tensor ops on the whole batch.

The host never waits for the device here. Per-pixel draws come from the batch's generator
on its own device; the few values the host must know to shape the work (which TrivialAugment
op each image runs, MixUp's lambda, CutMix's box) come from a host generator seeded from that
generator's seed, never from a device tensor (``int()`` of a CUDA draw waits for the GPU) and
never from the global ``torch.manual_seed`` (which also reseeds every GPU). The host values are
numpy draws, not CPU tensors, so nothing here converts a tensor to a Python number.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F


class BatchAugment:
    """Callable ``(x uint8 (B,H,W,3), y (B,)) -> (x float (B,3,H,W) normalised, y or soft targets)``."""

    def __init__(self, aug_cfg: Any, mean, std, num_classes: int) -> None:
        self.cfg = aug_cfg
        self.num_classes = num_classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # MixUp and CutMix (torchvision's recipe: one of them per batch, chosen uniformly)
        self.mixes = [(kind, float(alpha)) for kind, alpha in (("mixup", aug_cfg.mixup), ("cutmix", aug_cfg.cutmix))
                      if alpha > 0]
        self._host_for: Any = None  # the device generator the host generator below derives from
        self._host = np.random.default_rng(0)

    def host_rng(self, gen: torch.Generator) -> np.random.Generator:
        """The host generator of ``gen``: seeded from its seed, so a seed repeats every host draw too."""
        if self._host_for is not gen:  # a new epoch (or view) brings a new generator
            self._host_for = gen
            self._host = np.random.default_rng([gen.initial_seed(), 1])  # initial_seed() is host state: no sync
        return self._host

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        x = x.permute(0, 3, 1, 2)  # (B, 3, H, W) uint8, a view
        if cfg.trivial_augment:
            x = trivial_augment(x, self.host_rng(gen))
        x = x.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
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
        if self.mixes:
            x, y = mix_batch(x, y, self.num_classes, self.mixes, self.host_rng(gen))
        return x, y


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixes, rng: np.random.Generator
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a batch with its neighbour (torchvision v2's rule), lambda drawn on the host.

    ``mixes`` lists ``(kind, alpha)``; one is chosen uniformly. Each image is mixed with the
    one before it (``roll(1)``) and the targets become soft: ``lam * own + (1 - lam) * other``.
    """
    kind, alpha = mixes[int(rng.integers(len(mixes)))]
    lam = float(rng.beta(alpha, alpha))
    rolled = x.roll(1, 0)
    if kind == "mixup":
        x = rolled.mul_(1.0 - lam).add_(x.mul(lam))
    else:  # cutmix: a box of area about (1 - lam) comes from the neighbour
        h, w = x.shape[-2:]
        cx, cy = int(rng.integers(w)), int(rng.integers(h))
        r = 0.5 * math.sqrt(1.0 - lam)
        half_w, half_h = int(r * w), int(r * h)
        x1, y1, x2, y2 = max(cx - half_w, 0), max(cy - half_h, 0), min(cx + half_w, w), min(cy + half_h, h)
        x = x.clone()
        x[..., y1:y2, x1:x2] = rolled[..., y1:y2, x1:x2]
        lam = 1.0 - (x2 - x1) * (y2 - y1) / (w * h)
    soft = F.one_hot(y, num_classes).float() if y.ndim == 1 else y.float()  # (B, classes)
    return x, soft.roll(1, 0).mul_(1.0 - lam).add_(soft.mul(lam))


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


# --- TrivialAugment Wide, per op on the sub-batch that drew it ------------------------------------

# torchvision.transforms.v2.TrivialAugmentWide's ops and magnitudes (31 bins), in its order. The
# five geometric ops are adjacent, so one grid_sample serves every image that drew any of them.
TA_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
          "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_OP = {name: i for i, name in enumerate(TA_OPS)}
_BINS = 31
_RANGES = {"ShearX": (0.0, 0.99), "ShearY": (0.0, 0.99), "TranslateX": (0.0, 32.0), "TranslateY": (0.0, 32.0),
           "Rotate": (0.0, 135.0), "Brightness": (0.0, 0.99), "Color": (0.0, 0.99), "Contrast": (0.0, 0.99),
           "Sharpness": (0.0, 0.99), "Solarize": (1.0, 0.0)}  # magnitude at bin 0 and at the last bin
_MAGNITUDES = np.array([np.linspace(*_RANGES[n], _BINS) if n in _RANGES else np.zeros(_BINS) for n in TA_OPS])
_MAGNITUDES[_OP["Posterize"]] = 8 - np.round(np.arange(_BINS) / ((_BINS - 1) / 6))  # bits kept: 8 down to 2
_SIGNED = np.array([n in _RANGES and n != "Solarize" for n in TA_OPS])  # drawn with a random sign
_GEOMETRIC = (_OP["ShearX"], _OP["Rotate"] + 1)  # [first, end) of the affine ops in TA_OPS


def draw_trivial_augment(b: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Each image's op (B,) and signed magnitude (B,), as TrivialAugmentWide draws them per image."""
    ops = rng.integers(0, len(TA_OPS), b)
    bins = rng.integers(0, _BINS, b)
    negative = _SIGNED[ops] & (rng.random(b) < 0.5)
    return ops, np.where(negative, -1.0, 1.0) * _MAGNITUDES[ops, bins]


def trivial_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """TrivialAugment Wide on uint8 (B, 3, H, W): one random op per image, drawn on the host.

    The images are sorted by op (one gather), each op runs once on its contiguous sub-batch
    with per-image magnitudes, and the results go back to their places (one scatter): a few
    dozen kernel launches per batch whatever its size, instead of a chain per image.
    """
    ops, mags = draw_trivial_augment(x.shape[0], rng)
    return apply_trivial_augment(x, ops, mags)


def apply_trivial_augment(x: torch.Tensor, ops: np.ndarray, mags: np.ndarray) -> torch.Tensor:
    """``x`` uint8 (B, 3, H, W) with op ``ops[i]`` at magnitude ``mags[i]`` applied to image i."""
    h, w = x.shape[-2:]
    order = np.argsort(ops, kind="stable")
    ops, mags = ops[order], mags[order]
    ends = np.cumsum(np.bincount(ops, minlength=len(TA_OPS)))
    starts = np.concatenate([[0], ends[:-1]])
    # One host row per image: the op's scalar parameter, then the affine ops' sampling matrix.
    params = np.concatenate([_scalar_params(ops, mags)[:, None], _affine_rows(ops, mags, h, w)], 1)
    dev = x.device
    # (2, B): the sort and its inverse; pageable host memory is staged by the copy, so it never waits
    index = torch.from_numpy(np.stack([order, np.argsort(order)])).to(dev, non_blocking=True)
    params_t = torch.from_numpy(params.astype(np.float32)).to(dev, non_blocking=True)  # (B, 7)
    xs = x[index[0]]  # (B, 3, H, W), sorted by op
    pieces = []
    g0, g1 = _GEOMETRIC
    for k in range(len(TA_OPS)):  # starts/ends are numpy: host values, no device read
        if g0 < k < g1:
            continue  # run with the first geometric op
        s, e = (int(starts[g0]), int(ends[g1 - 1])) if k == g0 else (int(starts[k]), int(ends[k]))
        if e > s:
            pieces.append(_affine(xs[s:e], params_t[s:e, 1:]) if k == g0 else
                          _colour_op(TA_OPS[k], xs[s:e], params_t[s:e, 0].view(-1, 1, 1, 1)))
    return torch.cat(pieces)[index[1]]  # back in the batch's order (a gather, deterministic)


def _scalar_params(ops: np.ndarray, mags: np.ndarray) -> np.ndarray:
    """Each image's colour-op parameter: a blend factor, a posterize bit mask or a solarize threshold."""
    p = 1.0 + mags  # Brightness, Color, Contrast, Sharpness: factor 1 + magnitude
    bits = mags.astype(np.int64).clip(0, 8)
    p = np.where(ops == _OP["Posterize"], ((1 << bits) - 1) << (8 - bits), p)
    return np.where(ops == _OP["Solarize"], 255.0 * mags, p)


def _affine_rows(ops: np.ndarray, mags: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, 6) transposed inverse affine matrices, rescaled to grid units, as torchvision's affine builds them.

    Shears turn about the top-left corner, rotations about the centre; translations are whole
    pixels (``int(magnitude)``). Non-geometric rows come out as the identity and are not used.
    """
    shear = np.isin(ops, (_OP["ShearX"], _OP["ShearY"]))
    rot = np.radians(np.where(ops == _OP["Rotate"], -mags, 0.0))  # v2's rotate passes -angle to the matrix
    sx = np.where(ops == _OP["ShearX"], np.arctan(mags), 0.0)
    sy = np.where(ops == _OP["ShearY"], np.arctan(mags), 0.0)
    tx = np.where(ops == _OP["TranslateX"], np.trunc(mags), 0.0)
    ty = np.where(ops == _OP["TranslateY"], np.trunc(mags), 0.0)
    cx, cy = np.where(shear, -w * 0.5, 0.0), np.where(shear, -h * 0.5, 0.0)
    a = np.cos(rot - sy) / np.cos(sy)
    b = -(a * np.tan(sx) + np.sin(rot))
    c = np.sin(rot - sy) / np.cos(sy)
    d = np.cos(rot) - c * np.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a  # the inverse of [[a, b], [c, d]] (determinant 1)
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    # theta^T (3, 2) divided by (w/2, h/2) per column, flattened row-major
    return np.stack([m0 / (0.5 * w), m3 / (0.5 * h), m1 / (0.5 * w), m4 / (0.5 * h), m2 / (0.5 * w), m5 / (0.5 * h)], 1)


_CONSTANTS: Dict[Tuple[str, Any], torch.Tensor] = {}  # per-device constants, built on the device once


def _constant(name: str, device: torch.device, build) -> torch.Tensor:
    key = (name, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = build()
    return _CONSTANTS[key]


def _affine(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine warp of uint8 (n, 3, H, W), one matrix per image, zeros outside."""
    n, _, h, w = x.shape
    dev = x.device

    def base() -> torch.Tensor:  # pixel-centre coordinates (x, y, 1) relative to the image centre
        g = torch.empty(1, h, w, 3, device=dev)
        g[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=dev)
        g[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=dev).unsqueeze(-1)
        g[..., 2] = 1.0
        return g.view(1, h * w, 3)

    grid = torch.matmul(_constant(f"grid{h}x{w}", dev, base), rows.view(n, 3, 2)).view(n, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Floored luma (n, 1, H, W) float of uint8 RGB, as torchvision blends with."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(factor).add_(other * (1.0 - factor)).clamp_(0, 255).to(torch.uint8)


def _colour_op(name: str, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """One pixel op on uint8 (n, 3, H, W) with per-image parameter ``p`` (n, 1, 1, 1)."""
    if name == "Identity":
        return x
    if name == "Brightness":
        return x.mul(p).clamp_(0, 255).to(torch.uint8)
    if name == "Color":
        return _blend(x, _gray(x), p)
    if name == "Contrast":
        return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), p)
    if name == "Sharpness":
        if x.shape[-1] <= 2 or x.shape[-2] <= 2:
            return x
        kernel = _constant("sharpness", x.device, lambda: torch.tensor(
            [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device).div_(13.0).expand(3, 1, 3, 3))
        out = x.to(torch.float32, copy=True)
        blurred = F.conv2d(out, kernel, groups=3).round_()
        inner = out[..., 1:-1, 1:-1]  # the border keeps its pixels, as in PIL
        inner.add_(blurred.sub_(inner).mul_(1.0 - p))
        return out.clamp_(0, 255).to(torch.uint8)
    if name == "Posterize":
        return x & p.to(torch.uint8)
    if name == "Solarize":
        return torch.where(x >= p, 255 - x, x)
    if name == "AutoContrast":
        f = x.float()
        lo, hi = f.amin(dim=(-2, -1), keepdim=True), f.amax(dim=(-2, -1), keepdim=True)
        flat = hi == lo
        scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255))
        return f.sub_(torch.where(flat, 0.0, lo)).div_(scale).clamp_(0, 255).to(torch.uint8)
    if name == "Equalize":
        from torchvision.transforms.v2.functional import equalize

        return equalize(x)
    raise AssertionError(f"unknown TrivialAugment op {name}")
