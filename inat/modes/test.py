"""``python run.py +mode=test ckpt=PATH [data.root=ROOT | data.test_manifest=FILE]``: score the test set once.

Writes ``test.json`` and ``reliability.png`` into the output folder (``inat.holdout``).
The data root (and test manifest) is the checkpoint's own unless ``data.root`` (or
``data.test_manifest``) is among the command's overrides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from inat.holdout import test_checkpoint
from inat.modes import data_root_overridden
from inat.run_folder import TEST


def print_test(result: Dict[str, Any]) -> None:
    """The console summary of a test.json dict: accuracy, macro-F1, ECE, per-class accuracy."""
    print(f"test accuracy {result['accuracy']:.1%} on {result['n']} images ({result['data_root']})")
    cal = result.get("calibration")
    if cal:
        after = f", after T={cal['temperature']:.2f} {cal['after']['ece']:.1%}" if cal.get("after") else ""
        f1 = "-" if result.get("macro_f1") is None else f"{result['macro_f1']:.3f}"
        print(f"macro-F1 {f1}; ECE ({cal['bins']} bins) {cal['before']['ece']:.1%}{after}")
    rejection = result.get("rejection")
    if rejection:
        print(f"rejection: {rejection['note']}")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:<24} {'-' if acc is None else f'{acc:.1%}'}")


def run(cfg: Any, out_dir: Path) -> None:
    result = test_checkpoint(cfg.ckpt, out_dir, cfg.data.root if data_root_overridden() else None,
                             precision=cfg.train.precision,
                             test_manifest=cfg.data.test_manifest if data_root_overridden("test_manifest") else None)
    print_test(result)
    print(f"wrote {Path(out_dir) / TEST}")
