"""YOLOv3 camera-trap watcher: darknet loader (darknet.py), boxes (boxes.py), tracker, app.

``detect_mode(cfg, out_dir)`` is what ``python run.py +mode=detect`` calls; ``Detector``
is the reusable detector. Submodules import torch/OpenCV only when this package is used.
"""
from inat.detect.app import detect_mode
from inat.detect.detector import Detection, Detector

__all__ = ["detect_mode", "Detector", "Detection"]
