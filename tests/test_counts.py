"""Closed-form parameter and multiply-add counts agree exactly with numel() and torch's FLOP counter."""
from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from inat.config import Config
from inat.errors import InatError
from inat.models import build_from_config
from inat.models.info import measure
from inat.models.scratch import assignment_counts, count_macs, count_params
from conftest import run_cli


def config(**over):
    cfg = OmegaConf.structured(Config)
    for key, value in over.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def random_configs(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield {
            "filters.organisation": rng.choice(["same", "doubling", "halving"]),
            "filters.base": rng.choice([4, 8, 16, 32]),
            "model.kernel_size": rng.choice([1, 3, 5, [3, 5, 7, 3, 3], [2, 3, 4, 5, 6]]),
            "model.dense_units": rng.choice([8, 64, 100]),
            "model.batch_norm": rng.choice([True, False]),
            "data.image_size": rng.choice([32, 45, 64, 96, 100]),
            "act.name": rng.choice(["relu", "gelu", "mish", "tanh"]),
        }


@pytest.mark.parametrize("over", list(random_configs(24)))
def test_counts_match_measurement(over):
    cfg = config(**over)
    classes = 7
    model = build_from_config(cfg, classes)
    measured = measure(model, int(cfg.data.image_size))
    assert count_params(model.arch) == measured["params"]
    assert count_macs(model.arch) == measured["macs"]


@pytest.mark.parametrize("m,k,n,size", [(32, 3, 128, 96), (16, 5, 64, 224), (64, 7, 256, 128)])
def test_assignment_formula_is_exact(m, k, n, size):
    cfg = config(**{"filters.base": m, "model.kernel_size": k, "model.dense_units": n, "model.batch_norm": False,
                    "data.image_size": size})
    model = build_from_config(cfg, 10)
    params, macs = assignment_counts(m, k, n, size, size)
    assert params == count_params(model.arch) == sum(p.numel() for p in model.parameters())
    assert macs == count_macs(model.arch) == measure(model, size)["macs"]


def test_filter_list_of_wrong_length_is_refused():
    with pytest.raises(InatError, match="exactly 5"):
        build_from_config(config(**{"filters.organisation": "custom", "filters.custom": [8, 8, 8]}), 3)


def test_image_too_small_for_five_poolings():
    with pytest.raises(InatError, match="too small"):
        build_from_config(config(**{"data.image_size": 16}), 3)


def test_any_input_size_and_dense_act():
    cfg = config(**{"data.image_size": 70, "model.dense_act": "tanh", "act.name": "gelu"})
    model = build_from_config(cfg, 4)
    assert isinstance(model.dense.act, torch.nn.Tanh) and isinstance(model.blocks[0].act, torch.nn.GELU)
    assert model(torch.zeros(2, 3, 70, 70)).shape == (2, 4)


def test_info_mode_writes_matching_counts(tmp_path):
    r = run_cli(["+mode=info", "filters=doubling", "filters.base=8", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["params"] == info["params_measured"] and info["macs"] == info["macs_measured"]
    assert info["channels"] == [8, 16, 32, 64, 128]
