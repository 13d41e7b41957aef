"""``+mode=info``: closed-form parameter and multiply-add counts beside the measured ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig

from inat.errors import InatError
from inat.models import build_from_config
from inat.models.scratch import FORMULA_MACS, FORMULA_PARAMS, count_macs, count_params
from inat.runs import write_json


def measure(model: torch.nn.Module, size: int) -> Dict[str, int]:
    """``numel()`` of the parameters and torch's FLOP counter / 2 for one (1, 3, size, size) input."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return {"params": sum(p.numel() for p in model.parameters()), "macs": counter.get_total_flops() // 2}


def info_mode(cfg: DictConfig, out_dir: Path) -> Dict[str, Any]:
    """Print the formulas in m, k, n, H, W, their value for this config and the measured counts."""
    if cfg.model.name != "scratch":
        raise InatError("+mode=info gives closed-form counts for model=scratch; pretrained backbones report measured counts in summary.json.")
    num_classes = 10
    root = Path(cfg.data.root)
    if (root / "train").is_dir():
        num_classes = sum(1 for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    model = build_from_config(cfg, num_classes)
    arch = model.arch
    size = int(cfg.data.image_size)
    measured = measure(model, size)
    result = {
        "params": count_params(arch), "params_measured": measured["params"],
        "macs": count_macs(arch), "macs_measured": measured["macs"],
        "formula_params": FORMULA_PARAMS, "formula_macs": FORMULA_MACS,
        "formula_assumes": "m filters of k x k in every layer, n dense units, 10 classes, no batch norm, H and W divisible by 32",
        "channels": list(arch.channels), "kernels": list(arch.kernels), "dense_units": arch.dense_units,
        "num_classes": num_classes, "height": arch.height, "width": arch.width, "batch_norm": arch.batch_norm,
    }
    write_json(Path(out_dir) / "info.json", result)
    print("Scratch CNN, 5 x (conv -> [BN] -> act -> maxpool 2x2) -> dense -> act -> dropout -> output")
    print(f"  channels {list(arch.channels)}  kernels {list(arch.kernels)}  dense {arch.dense_units}  "
          f"classes {num_classes}  input {size}x{size}x3  batch_norm {arch.batch_norm}")
    print(f"  parameters = {FORMULA_PARAMS}")
    print(f"  multiply-adds = {FORMULA_MACS}")
    print("  (general form used below: sum_i k_i^2 C_(i-1) C_i [+ C_i bias + 2 C_i BN] + C5 (H/32)(W/32) n + n + n*classes + classes)")
    print(f"  parameters:    closed form {result['params']:,}   measured numel() {result['params_measured']:,}")
    print(f"  multiply-adds: closed form {result['macs']:,}   measured FLOP counter/2 {result['macs_measured']:,}")
    if result["params"] != result["params_measured"] or result["macs"] != result["macs_measured"]:
        raise InatError("Closed-form and measured counts disagree; this is a bug in inat, please report it.")
    return result
