"""Decoding one image into a fixed-size uint8 array, and normalising batches of them.

Everything that turns a file into pixels goes through ``open_upright`` (training cache, test,
predict, explain, export checks, detect's frames), so a checkpoint's preprocessing is the same
everywhere and EXIF orientation is applied once, in one place.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from inat.errors import InatError

_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def decode_image(path, size: int, interpolation: str = "bilinear", crop_pct: float = 1.0,
                 name: str | None = None) -> np.ndarray:
    """Decode upright, convert to RGB, resize the shorter side to ``size / crop_pct`` and centre-crop.

    Returns (size, size, 3) uint8. JPEG draft mode lets libjpeg decode large photos at a
    reduced scale directly, which is most of the decode time saved on big images.
    ``path`` may be a file path or a binary file object (then ``name`` labels it in
    errors). Unreadable or truncated files raise InatError naming the file.
    """
    target = max(size, int(round(size / crop_pct)))
    return fit_image(open_upright(path, target, name), size, interpolation, crop_pct)


def open_upright(path, draft: int | None = None, name: str | None = None):
    """The RGB PIL image in ``path`` (a file path or binary file object), turned upright.

    Phones store photos as the sensor saw them plus an EXIF orientation tag; without
    applying it a portrait photo trains and predicts lying on its side, so every decode
    (cache, test, predict, explain, detect frames) goes through here. ``draft`` asks libjpeg
    for the smallest scale whose sides stay >= ``draft`` pixels. Errors name the file
    (``name`` when ``path`` is a file object) in one InatError sentence.
    """
    try:
        with Image.open(path) as img:
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))  # square request: the same scale whichever way the photo is turned
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except Exception as err:  # PIL raises many types for bad files; the user needs the path
        label = name or path
        # PIL names a file object by its repr ("<_io.BytesIO object at 0x...>"): show the file instead.
        reason = re.sub(r"<_io\.\w+ object at 0x[0-9a-f]+>|<_io\.\w+ name=[^>]*>", f"'{label}'", str(err))
        raise InatError(f"Image '{label}' could not be decoded ({type(err).__name__}: {reason}); run +mode=audit to list bad files.") from err


def to_rgb(img):
    """8-bit RGB of any PIL image; 16- and 32-bit grayscale are scaled, not clipped.

    PIL's ``convert("RGB")`` clips mode ``I;16``/``I`` values above 255, so a 16-bit PNG would
    decode as an all-white image; dividing by 257 maps 0..65535 onto 0..255 exactly.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img).astype(np.float64)  # (H, W); mode I is read as 16-bit too (PNG's own range)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def fit_image(img, size: int, interpolation: str = "bilinear", crop_pct: float = 1.0) -> np.ndarray:
    """A PIL RGB image resized (shorter side ``size / crop_pct``) and centre-cropped to uint8 (size, size, 3)."""
    resample = _RESAMPLE.get(interpolation)
    if resample is None:
        raise InatError(f"Unknown interpolation '{interpolation}': valid are {', '.join(_RESAMPLE)}.")
    target = max(size, int(round(size / crop_pct)))
    w, h = img.size
    scale = target / min(w, h)
    nw, nh = max(target, round(w * scale)), max(target, round(h * scale))
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_float(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W) uint8 -> (B, 3, H, W) float32, normalised."""
    if batch.shape[-1] == 3 and batch.shape[1] != 3:
        batch = batch.permute(0, 3, 1, 2)
    x = batch.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def load_batch(paths: Sequence[str | Path], size: int, mean: Sequence[float], std: Sequence[float],
               interpolation: str = "bilinear") -> torch.Tensor:
    """Decode files into one normalised (B, 3, size, size) float batch."""
    arrays = np.stack([decode_image(p, size, interpolation) for p in paths])
    return to_float(torch.from_numpy(arrays), mean, std)
