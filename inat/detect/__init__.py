"""YOLOv3 camera-trap watcher: darknet loader (darknet.py), boxes (boxes.py), tracker, app.

``watch(detect_cfg, out_dir)`` is what ``python run.py +mode=detect`` calls
(``inat/modes/detect.py``); ``Detector`` is the reusable detector. Submodules import torch/OpenCV only when this package is used.
"""
from inat.detect.app import print_summary, watch
from inat.detect.detector import Detection, Detector

__all__ = ["watch", "print_summary", "Detector", "Detection"]
