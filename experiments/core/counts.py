"""The scratch CNN's closed-form counts beside the measured ones, for the README's counts row.

    python experiments/core/counts.py    # writes experiments/core/counts.json

For the assignment's textbook case (m=32 filters of 3x3 in every layer, n=128 dense units,
96x96x3 input, no batch norm, 10 classes): the closed form, ``count_params``/``count_macs`` on
the built model, ``numel()`` and torch's FLOP counter (multiply-adds = FLOPs / 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from inat.config import Config
from inat.models import build_from_config
from inat.models.info import measure
from inat.models.scratch import assignment_counts, count_macs, count_params


def main() -> None:
    m, k, n, size = 32, 3, 128, 96
    cfg = OmegaConf.structured(Config)
    for key, value in {"filters.base": m, "model.kernel_size": k, "model.dense_units": n, "model.batch_norm": False,
                       "data.image_size": size}.items():
        OmegaConf.update(cfg, key, value)
    model = build_from_config(cfg, 10)
    params, macs = assignment_counts(m, k, n, size, size)
    measured = measure(model, size)
    result = {"m": m, "k": k, "n": n, "image_size": size, "classes": 10,
              "formula_params": params, "formula_macs": macs,
              "count_params": count_params(model.arch), "count_macs": count_macs(model.arch),
              "numel_params": sum(p.numel() for p in model.parameters()), "flop_counter_macs": measured["macs"]}
    result["all_equal"] = (params == result["count_params"] == result["numel_params"]
                           and macs == result["count_macs"] == result["flop_counter_macs"])
    out = Path(__file__).with_name("counts.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
