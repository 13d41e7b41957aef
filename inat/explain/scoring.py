"""Score a checkpoint on its test folder once; every explain figure reads these scores.

The test folder is read through ``read_test_set`` (the test-folder guard plus the leak check,
shared with test mode), decoded with the checkpoint's own
preprocessing (``ModelSpec`` size, mean, std, interpolation) and pushed through the model in
batches under ``torch.no_grad``. While scoring, a forward hook on ``model.last_conv()``
keeps each CONV5 channel's maximum spatial activation per image, which is what guided
backprop needs to pick neurons and the images that excite them most.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from inat.data.images import decode_image, to_float
from inat.models.base import InatModel, ModelSpec


@dataclass
class TestScores:
    """A model's view of the test set: images, labels, probabilities, CONV5 maxima."""

    classes: List[str]
    paths: List[Path]
    labels: np.ndarray  # (N,) int64
    images: np.ndarray  # (N, S, S, 3) uint8, exactly what the model saw (before normalising)
    probs: np.ndarray  # (N, K) float32 softmax
    conv5_max: np.ndarray  # (N, C5) float32: max over (h, w) of each CONV5 channel

    @property
    def preds(self) -> np.ndarray:
        """(N,) predicted class index."""
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy as a fraction in [0, 1] (0 for an empty set)."""
        return float((self.preds == self.labels).mean()) if len(self.labels) else 0.0

    def confusion(self) -> np.ndarray:
        """(K, K) counts, rows = true class, columns = predicted class."""
        k = len(self.classes)
        cm = np.zeros((k, k), dtype=np.int64)
        np.add.at(cm, (self.labels, self.preds), 1)
        return cm


def decode_many(paths: Sequence[Path], spec: ModelSpec, workers: int = 2) -> np.ndarray:
    """Decode files to (N, S, S, 3) uint8 with the spec's size and interpolation.

    PIL releases the GIL while decoding and resizing, so a small thread pool roughly
    divides the wall time by the number of cores without pickling images across processes.
    """
    size = int(spec.input_size)
    crop_pct = float(spec.crop_pct)  # pretrained specs resize larger then centre-crop
    if not paths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(lambda p: decode_image(p, size, spec.interpolation, crop_pct), paths))
    return np.stack(arrays)


def normalise(images: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 with the spec's mean and std."""
    return to_float(torch.from_numpy(np.array(images)), spec.mean, spec.std)  # copy: the cache is read-only


def score_images(model: InatModel, spec: ModelSpec, images: np.ndarray, batch_size: int = 128,
                 tta_flip: bool = False, precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Batched no-grad forward passes: ``(probs (N, K), conv5_max (N, C5))``.

    With ``tta_flip`` the logits are averaged with the mirrored image's, as test mode does,
    so the accuracy here matches test.json; CONV5 maxima come from the unmirrored pass.
    The forward passes are the inference module's, under the process's precision policy.
    """
    from inat.inference import batched_logits, process_precision

    captured: List[torch.Tensor] = []
    keep = [True]

    def keep_max(_module, _inputs, output: torch.Tensor) -> None:
        if keep[0]:
            captured.append(output.detach().amax(dim=(2, 3)).float().cpu())  # (B, C5, h, w) -> (B, C5)
        if tta_flip:  # with TTA every second call is the mirrored pass
            keep[0] = not keep[0]

    device = next(model.parameters()).device
    handle = model.last_conv().register_forward_hook(keep_max)
    try:
        logits = batched_logits(model, images, spec.mean, spec.std, process_precision(precision, device, announce=False),
                                batch_size=batch_size, tta_flip=tta_flip, device=device, channels_last=False)
    finally:
        handle.remove()
    if len(logits) == 0:
        return np.zeros((0, spec.num_classes), np.float32), np.zeros((0, 0), np.float32)
    return torch.softmax(logits, dim=1).numpy(), torch.cat(captured).numpy()


def score_test_set(model: InatModel, spec: ModelSpec, state: dict, root: str | Path, batch_size: int = 128,
                   tta_flip: bool = False, cache_dir: str = "") -> TestScores:
    """List, decode and score the test folder of ``root`` for checkpoint ``state``'s model.

    Reading goes through ``read_test_set``, the guarded path test mode uses (leak check
    included), and its decode-once cache, so explaining a checkpoint that was already tested
    reads tensors instead of JPEGs.
    """
    from inat.data.testset import read_test_set

    split, cache = read_test_set(state, root, int(spec.input_size), purpose="explain", interpolation=spec.interpolation,
                                 crop_pct=float(spec.crop_pct), cache_dir=cache_dir)
    images = np.asarray(cache.images)  # (N, S, S, 3) uint8 memory map
    probs, conv5 = score_images(model, spec, images, batch_size, tta_flip)
    classes = list(state["classes"])
    return TestScores(classes, list(split.paths), np.asarray(split.labels, dtype=np.int64), images, probs, conv5)
