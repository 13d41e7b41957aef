"""A checkpoint ready to score images: model, device, precision, temperature and preprocessing in one object.

Every command that scores with a trained checkpoint starts here: test mode (``holdout``),
predict, explain, detect's species namer and export. ``Predictor.from_checkpoint(path)``
loads the file once (``weights_only=True``, through ``inat.checkpoint.load_checkpoint``),
rebuilds the model from the config it carries, puts it on the device ``pick_device`` chooses
(the local rank's GPU, else the CPU) in eval mode, decides the precision policy of this
process (not the checkpoint's: another machine may lack it), and keeps the fitted
temperature and the spec's preprocessing. Callers pass uint8 images or files and get logits,
probabilities or the top k; the forward passes are ``inference.batched_logits``'.

The Predictor never lists or reads a data folder: the test folder stays behind
``inat.data.testset.read_test_set``, which test mode and explain call with the Predictor's
``state`` and preprocessing.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from inat.calibration import REJECTION_KEY, apply_temperature, checkpoint_temperature, checkpoint_threshold
from inat.checkpoint import load_checkpoint
from inat.errors import InatError
from inat.inference import Precision, Preprocess, batched_logits, pick_device, process_precision
from inat.models import InatModel, ModelSpec, model_from_state

UNKNOWN = "unknown"  # what predict and detect's namer answer below the rejection threshold


@dataclass
class Predictor:
    """A trained model on its device, with what it takes to score images exactly as its run did."""

    model: InatModel  # in eval mode, on ``device``
    classes: List[str]
    device: torch.device
    precision: Precision  # this process's autocast policy for ``device``
    temperature: Optional[float] = None  # the checkpoint's fitted T; None when training kept the raw softmax
    calibrated: bool = True  # whether probabilities divide the logits by ``temperature``
    tta_flip: bool = False  # the run's aug.tta_flip: logits averaged with the mirrored image's
    channels_last: bool = False  # the run's train.channels_last, on CUDA only (a tensor-core layout)
    state: Dict[str, Any] = field(default_factory=dict, repr=False)  # the loaded checkpoint: config, split hashes
    path: Optional[Path] = None
    preprocess: Preprocess = field(init=False)

    def __post_init__(self) -> None:
        self.preprocess = Preprocess.from_spec(self.spec)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, precision: str | Precision = "auto",
                        device: Optional[torch.device | str] = None, calibrated: bool = True,
                        announce: bool = False) -> "Predictor":
        """Load ``path`` and build its Predictor (see :meth:`from_state`).

        A file that is not a complete inat checkpoint, or whose weights do not fit the model
        its config describes, is refused with one sentence naming the path.
        """
        return cls.from_state(load_checkpoint(path), path=Path(path), precision=precision, device=device,
                              calibrated=calibrated, announce=announce)

    @classmethod
    def from_state(cls, state: Dict[str, Any], *, model: Optional[InatModel] = None, path: Optional[Path] = None,
                   precision: str | Precision = "auto", device: Optional[torch.device | str] = None,
                   calibrated: bool = True, announce: bool = False) -> "Predictor":
        """The Predictor of a loaded checkpoint dict (``model``: one already rebuilt from it).

        ``device`` None means :func:`~inat.inference.pick_device`. ``precision`` is a
        ``train.precision`` value (auto|32|bf16|16) decided for that device once per process
        (printed when ``announce``), or a ready :class:`~inat.inference.Precision`.
        """
        if model is None:
            try:
                model = model_from_state(state)
            except InatError as err:
                raise InatError(f"Checkpoint '{path}': {err}" if path is not None else str(err)) from err
        device = torch.device(device) if device is not None else pick_device()
        config = state["config"]
        channels_last = device.type == "cuda" and bool(config.get("train", {}).get("channels_last", False))
        model.to(device).eval()
        if channels_last:
            model.to(memory_format=torch.channels_last)  # the layout training used, so no per-call weight copy
        policy = precision if isinstance(precision, Precision) else process_precision(precision, device,
                                                                                      announce=announce)
        return cls(model, list(state["classes"]), device, policy, checkpoint_temperature(state), calibrated,
                   tta_flip=bool(config.get("aug", {}).get("tta_flip", False)), channels_last=channels_last,
                   state=state, path=path)

    @property
    def spec(self) -> ModelSpec:
        """The model's spec: input size, mean, std, interpolation, crop."""
        return self.model.spec

    @property
    def config(self) -> Dict[str, Any]:
        """The run's resolved config, as the checkpoint stores it."""
        return self.state.get("config", {})

    @property
    def applied_temperature(self) -> Optional[float]:
        """The T :meth:`probabilities` divides by: the checkpoint's when ``calibrated``, else None (raw softmax)."""
        return self.temperature if self.calibrated else None

    @property
    def reject_threshold(self) -> Optional[float]:
        """The calibrated top-1 probability below which an image is ``unknown``, chosen on the run's
        validation split at training's end; None when none reached the target or the checkpoint predates it."""
        return checkpoint_threshold(self.state)

    def require_threshold(self) -> float:
        """:attr:`reject_threshold`, or InatError when the checkpoint stores none or the probabilities
        are the raw softmax of a calibrated checkpoint (the threshold is a calibrated probability)."""
        threshold = self.reject_threshold
        if threshold is None:
            why = (self.state.get(REJECTION_KEY) or {}).get("note") or "it was trained before rejection thresholds existed"
            raise InatError(f"Checkpoint '{self.path}' stores no rejection threshold ({why}), so predict.reject=true "
                            f"cannot say 'unknown'; retrain it, or leave predict.reject at false.")
        if self.temperature is not None and not self.calibrated:
            raise InatError("predict.reject=true compares calibrated probabilities with the checkpoint's threshold; "
                            "drop predict.calibrated=false.")
        return threshold

    def rejected(self, probs: torch.Tensor) -> torch.Tensor:
        """(N,) bool: rows of ``probs`` whose top-1 probability is below :meth:`require_threshold`'s threshold."""
        return probs.max(dim=1).values < self.require_threshold()

    def decode(self, paths: Sequence[str | os.PathLike], workers: int = 2) -> np.ndarray:
        """Image files to (N, S, S, 3) uint8 with the checkpoint's preprocessing; a bad file raises InatError."""
        return decode_files(self.preprocess, paths, workers)

    def logits(self, images: np.ndarray | torch.Tensor, *, tta: Optional[bool] = None, batch_size: int = 256,
               progress: Optional[str] = None) -> torch.Tensor:
        """Float32 logits (N, classes) on the CPU of uint8 (N, S, S, 3) images.

        ``tta`` None scores as the run was tested (its ``aug.tta_flip``); True/False force it.
        """
        return batched_logits(self.model, images, self.spec.mean, self.spec.std, self.precision, batch_size=batch_size,
                              tta_flip=self.tta_flip if tta is None else tta, device=self.device,
                              channels_last=self.channels_last, progress=progress)

    def probabilities_of(self, logits: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / T)`` (N, classes), T the :attr:`applied_temperature` (none: the raw softmax)."""
        return apply_temperature(logits, self.applied_temperature).softmax(dim=1)

    def probabilities(self, images: np.ndarray | torch.Tensor, *, tta: Optional[bool] = None,
                      batch_size: int = 256) -> torch.Tensor:
        """Probabilities (N, classes) of uint8 (N, S, S, 3) images: :meth:`logits` then :meth:`probabilities_of`."""
        return self.probabilities_of(self.logits(images, tta=tta, batch_size=batch_size))

    def top_k(self, probs: torch.Tensor, k: int) -> List[List[Tuple[str, float]]]:
        """Per row of ``probs`` (N, classes), the ``k`` most probable ``(class, probability)``, best
        first; ``k`` is clamped to the number of classes."""
        values, indices = probs.topk(min(int(k), len(self.classes)), dim=1)
        return [[(self.classes[int(i)], float(v)) for v, i in zip(row_v, row_i)] for row_v, row_i in zip(values, indices)]


def decode_files(preprocess: Preprocess, paths: Sequence[str | os.PathLike], workers: int = 2) -> np.ndarray:
    """Decode files to (N, S, S, 3) uint8 with ``preprocess``.

    PIL releases the GIL while decoding and resizing, so a small thread pool roughly divides
    the wall time by the number of cores without pickling images across processes.
    """
    size = int(preprocess.size)
    if not paths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(preprocess.file, paths))
    return np.stack(arrays)
