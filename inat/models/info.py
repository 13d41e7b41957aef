"""``+mode=info``: closed-form parameter and multiply-add counts beside the measured ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from inat.data.dataset import dataset_root, scan_train_set, uses_manifest
from inat.errors import InatError
from inat.models import build_from_config
from inat.models.scratch import FORMULA_MACS, FORMULA_PARAMS, count_macs, count_params


def measure(model: torch.nn.Module, size: int) -> Dict[str, int]:
    """``numel()`` of the parameters and torch's FLOP counter / 2 for one (1, 3, size, size) input."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return {"params": sum(p.numel() for p in model.parameters()), "macs": counter.get_total_flops() // 2}


def scratch_counts(cfg: DictConfig) -> Dict[str, Any]:
    """info.json's content: the closed-form counts for this config beside the measured ones.

    The formulas (``FORMULA_PARAMS``, ``FORMULA_MACS``) are in m, k, n, H, W; the general form
    used for the numbers sums over the five blocks. Raises when they disagree (a bug in inat).
    """
    if cfg.model.name != "scratch":
        raise InatError("+mode=info gives closed-form counts for model=scratch; pretrained backbones report measured counts in summary.json.")
    num_classes = 10
    root = Path(cfg.data.root)
    if uses_manifest(cfg.data):
        num_classes = len(scan_train_set(cfg.data, dataset_root(cfg.data, fetch=False)).classes)
    elif (root / "train").is_dir():
        num_classes = sum(1 for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    model = build_from_config(cfg, num_classes)
    arch = model.arch
    measured = measure(model, int(cfg.data.image_size))
    result = {
        "params": count_params(arch), "params_measured": measured["params"],
        "macs": count_macs(arch), "macs_measured": measured["macs"],
        "formula_params": FORMULA_PARAMS, "formula_macs": FORMULA_MACS,
        "formula_assumes": "m filters of k x k in every layer, n dense units, 10 classes, no batch norm, H and W divisible by 32",
        "channels": list(arch.channels), "kernels": list(arch.kernels), "dense_units": arch.dense_units,
        "num_classes": num_classes, "height": arch.height, "width": arch.width, "batch_norm": arch.batch_norm,
    }
    if result["params"] != result["params_measured"] or result["macs"] != result["macs_measured"]:
        raise InatError("Closed-form and measured counts disagree; this is a bug in inat, please report it.")
    return result
