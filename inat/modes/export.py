"""``python run.py +mode=export ckpt=PATH [export.format=onnx|torchscript]``: the verified file plus export.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def run(cfg: Any, out_dir: Path) -> None:
    from inat.export import export_checkpoint
    from inat.run_folder import EXPORT

    e = cfg.export
    result = export_checkpoint(cfg.ckpt, out_dir, fmt=str(e.format), verify_images=int(e.verify_images),
                               opset=int(e.opset), onnx_exporter=str(e.onnx_exporter), tolerance=float(e.tolerance),
                               calibrated=bool(e.calibrated))
    opset = f", opset {result['opset']}" if result["opset"] is not None else ""
    print(f"exported {result['format']}{opset}: max |logit difference| to PyTorch {result['max_abs_diff']:.2e} "
          f"on {result['n_images']} images from {result['images']}")
    print(f"wrote {result['path']} and {Path(out_dir) / EXPORT}")
