"""``python run.py +mode=detect detect.inputs=[...] detect.watch=[...]``: the YOLOv3 camera-trap watcher."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.detect import print_summary, watch


def run(cfg: Any, out_dir: Path) -> None:
    summary = watch(cfg.detect, Path(out_dir), reject=cfg.predict.reject)
    print_summary(summary, Path(out_dir))
