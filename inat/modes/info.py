"""``python run.py +mode=info model=scratch [...]``: the closed-form parameter and multiply-add counts.

Prints the formulas in m, k, n, H, W, their value for this config and the measured counts,
and writes info.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from inat.models.info import scratch_counts
from inat.run_folder import INFO
from inat.runs import write_json


def run(cfg: Any, out_dir: Path) -> Dict[str, Any]:
    r = scratch_counts(cfg)
    write_json(Path(out_dir) / INFO, r)
    size = cfg.data.image_size
    print("Scratch CNN, 5 x (conv -> [BN] -> act -> maxpool 2x2) -> dense -> act -> dropout -> output")
    print(f"  channels {r['channels']}  kernels {r['kernels']}  dense {r['dense_units']}  "
          f"classes {r['num_classes']}  input {size}x{size}x3  batch_norm {r['batch_norm']}")
    print(f"  parameters = {r['formula_params']}")
    print(f"  multiply-adds = {r['formula_macs']}")
    print("  (general form used below: sum_i k_i^2 C_(i-1) C_i [+ C_i bias + 2 C_i BN] + C5 (H/32)(W/32) n + n + n*classes + classes)")
    print(f"  parameters:    closed form {r['params']:,}   measured numel() {r['params_measured']:,}")
    print(f"  multiply-adds: closed form {r['macs']:,}   measured FLOP counter/2 {r['macs_measured']:,}")
    return r
