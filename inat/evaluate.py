"""Test mode: score a checkpoint on the test folder once, behind a leakage guard.

``+mode=test ckpt=PATH`` rebuilds the model from the checkpoint's own config, decodes the
test folder with the model's preprocessing, refuses to score if any test image is
byte-identical to an image the run trained or validated on, and writes ``test.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from inat.checkpoint import load_checkpoint
from inat.data.testset import check_leakage, read_test_set  # noqa: F401 - check_leakage re-exported
from inat.models import model_from_state
from inat.runs import write_json
from inat.inference import batched_logits, pick_device, process_precision


def test_checkpoint(ckpt_path: str | Path, out_dir: Path, data_root: Optional[str] = None,
                    batch_size: int = 256, progress: bool = True, precision: str = "auto") -> Dict[str, Any]:
    """Score ``ckpt_path`` on the test folder of ``data_root`` (default: the run's root).

    ``precision`` is this process's policy (``train.precision`` of the command, ``auto`` by
    default), not the one the checkpoint was trained under: another machine may lack it.
    """
    state = load_checkpoint(ckpt_path)
    cfg = OmegaConf.create(state["config"])
    classes = list(state["classes"])
    root = Path(data_root or cfg.data.root)
    model = model_from_state(state)
    device = pick_device()
    model.to(device).eval()
    spec = model.spec
    folder, cache = read_test_set(state, root, int(spec.input_size), purpose="test mode", interpolation=spec.interpolation,
                                  crop_pct=float(spec.crop_pct), cache_dir=cfg.data.cache_dir, progress=progress)
    policy = process_precision(precision, device)
    logits = batched_logits(model, cache.images, spec.mean, spec.std, policy, batch_size=batch_size,
                            tta_flip=bool(cfg.aug.tta_flip), device=device,
                            channels_last=bool(cfg.train.channels_last), progress="test" if progress else None)
    y = np.asarray(folder.labels)
    pred = logits.argmax(1).numpy()
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    per_class = {c: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
                 for i, c in enumerate(classes)}
    result = {"accuracy": float((pred == y).mean()), "n": int(len(y)), "per_class_accuracy": per_class,
              "confusion_matrix": confusion.tolist(), "classes": classes, "ckpt": str(Path(ckpt_path).resolve()),
              "data_root": str(root), "tta_flip": bool(cfg.aug.tta_flip),
              "loss": float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)))}
    write_json(Path(out_dir) / "test.json", result)
    return result


def print_test(result: Dict[str, Any]) -> None:
    """Human summary of a test.json dict."""
    print(f"test accuracy {result['accuracy']:.1%} on {result['n']} images ({result['data_root']})")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:<24} {'-' if acc is None else f'{acc:.1%}'}")


def test_mode(cfg: DictConfig, out_dir: Path) -> None:
    """``+mode=test ckpt=PATH [data.root=ROOT]``: writes test.json into the output folder."""
    from hydra.core.hydra_config import HydraConfig

    overridden_root = any(o.startswith("data.root=") for o in HydraConfig.get().overrides.task)
    result = test_checkpoint(cfg.ckpt, out_dir, cfg.data.root if overridden_root else None,
                             precision=cfg.train.precision)
    print_test(result)
    print(f"wrote {Path(out_dir) / 'test.json'}")
