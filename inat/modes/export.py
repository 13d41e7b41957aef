"""``python run.py +mode=export ckpt=PATH [export.format=onnx|torchscript] [export.quantize=dynamic|static]``:
the verified file (and its accuracy-gated int8 copy) plus export.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.export import export_checkpoint
from inat.run_folder import EXPORT


def run(cfg: Any, out_dir: Path) -> None:
    e = cfg.export
    options = dict(fmt=e.format, verify_images=e.verify_images, opset=e.opset, onnx_exporter=e.onnx_exporter,
                   tolerance=e.tolerance, calibrated=e.calibrated, quantize=e.quantize, max_drop=e.max_drop,
                   calibration_images=e.calibration_images)
    if options["quantize"] == "none":
        result = export_checkpoint(cfg.ckpt, out_dir, **options)
    else:
        from inat.quantize import GateRefused, describe  # onnx and onnxruntime load only to quantize

        try:
            result = export_checkpoint(cfg.ckpt, out_dir, **options)
        except GateRefused as refused:
            for line in describe(refused.record):  # the numbers behind the refusal, then its sentence
                print(line)
            raise
    opset = f", opset {result['opset']}" if result["opset"] is not None else ""
    print(f"exported {result['format']}{opset}: max |logit difference| to PyTorch {result['max_abs_diff']:.2e} "
          f"on {result['n_images']} images from {result['images']}")
    if "quantize" in result:
        for line in describe(result["quantize"]):
            print(line)
        print(f"wrote {result['path']}, {result['quantize']['path']} and {Path(out_dir) / EXPORT}")
    else:
        print(f"wrote {result['path']} and {Path(out_dir) / EXPORT}")
