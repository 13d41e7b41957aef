"""``python run.py +mode=predict ckpt=PATH predict.inputs=[PATH,...]``: top-k classes per image, as text and JSONL."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.predict import predict_images


def run(cfg: Any, out_dir: Path) -> None:
    p = cfg.predict
    result = predict_images(cfg.ckpt, list(p.inputs), out_dir, top_k=p.top_k, tta=p.tta,
                            batch_size=p.batch_size, workers=p.workers, precision=cfg.train.precision,
                            calibrated=p.calibrated, reject=p.reject)
    skipped = f"; skipped {len(result.skipped)} unreadable file(s)" if result.skipped else ""
    unknown = (f"; {result.unknown} unknown (below the threshold {result.reject_threshold:.3f})"
               if result.reject_threshold is not None else "")
    calibration = f"calibrated, T={result.temperature:.2f}" if result.temperature is not None else "raw softmax"
    print(f"scored {len(result.records)} image(s){skipped}{unknown} ({calibration}); wrote {result.path}")
