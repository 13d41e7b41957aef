"""Score a checkpoint on its test folder once; every explain figure reads these scores.

The test folder is read through ``read_test_set`` (the test-folder guard plus the leak check,
shared with test mode), decoded with the checkpoint's own preprocessing (``ModelSpec`` size,
interpolation, crop) and scored by the checkpoint's ``Predictor``: on the device it picked,
under its precision policy, with its temperature. While scoring, a forward hook on
``model.last_conv()`` keeps each CONV5 channel's maximum spatial activation per image, which
is what guided backprop needs to pick neurons and the images that excite them most.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from inat.data.images import to_float
from inat.data.testset import read_test_set
from inat.inference import Preprocess
from inat.models.base import InatModel, ModelSpec
from inat.predictor import Predictor, decode_files


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
    """Decode files to (N, S, S, 3) uint8 with the spec's preprocessing (``Predictor.decode`` without a model)."""
    return decode_files(Preprocess.from_spec(spec), paths, workers)


def normalise(images: np.ndarray, spec: ModelSpec, device: Optional[torch.device] = None) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 with the spec's mean and std, on ``device`` (default the CPU)."""
    x = to_float(torch.from_numpy(np.array(images)), spec.mean, spec.std)  # copy: the cache is read-only
    return x if device is None else x.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: the figures feed their inputs there."""
    return next(model.parameters()).device


def score_images(predictor: Predictor, images: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Batched no-grad forward passes: ``(probs (N, K), conv5_max (N, C5))``.

    The Predictor scores as test mode does (its run's ``aug.tta_flip``, so the accuracy here
    matches test.json) and its probabilities are calibrated when the run fitted a temperature;
    CONV5 maxima come from the unmirrored pass.
    """
    model, spec = predictor.model, predictor.spec
    captured: List[torch.Tensor] = []
    keep = [True]

    def keep_max(_module, _inputs, output: torch.Tensor) -> None:
        if keep[0]:
            captured.append(output.detach().amax(dim=(2, 3)).float().cpu())  # (B, C5, h, w) -> (B, C5)
        if predictor.tta_flip:  # with TTA every second call is the mirrored pass
            keep[0] = not keep[0]

    handle = model.last_conv().register_forward_hook(keep_max)
    try:
        logits = predictor.logits(images, batch_size=batch_size)
    finally:
        handle.remove()
    if len(logits) == 0:
        return np.zeros((0, spec.num_classes), np.float32), np.zeros((0, 0), np.float32)
    return predictor.probabilities_of(logits).numpy(), torch.cat(captured).numpy()


def score_test_folder(predictor: Predictor, root: str | Path, batch_size: int = 128, cache_dir: str = "") -> TestScores:
    """List, decode and score the test folder of ``root`` with the checkpoint's ``predictor``.

    Reading goes through ``read_test_set``, the guarded path test mode uses (leak check
    included), and its decode-once cache, so explaining a checkpoint that was already tested
    reads tensors instead of JPEGs.
    """
    spec = predictor.spec
    split, cache = read_test_set(predictor.state, root, int(spec.input_size), purpose="explain",
                                 interpolation=spec.interpolation, crop_pct=float(spec.crop_pct), cache_dir=cache_dir)
    images = np.asarray(cache.images)  # (N, S, S, 3) uint8 memory map
    probs, conv5 = score_images(predictor, images, batch_size)
    return TestScores(list(predictor.classes), list(split.paths), np.asarray(split.labels, dtype=np.int64), images,
                      probs, conv5)


def score_test_set(model: InatModel, spec: ModelSpec, state: dict, root: str | Path, batch_size: int = 128,
                   tta_flip: bool = False, cache_dir: str = "") -> TestScores:
    """:func:`score_test_folder` for a model already rebuilt from checkpoint ``state``, where it is.

    Probabilities are the raw softmax here (a caller holding only a model decides on the
    temperature itself); ``tta_flip`` as given.
    """
    predictor = Predictor.from_state(state, model=model, device=model_device(model), calibrated=False)
    predictor.tta_flip = tta_flip
    return score_test_folder(predictor, root, batch_size, cache_dir)
