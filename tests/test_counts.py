"""Closed-form parameter and multiply-add counts agree exactly with numel() and torch's FLOP counter."""
from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from inat.config import Config, FiltersConfig, ModelConfig
from inat.errors import InatError
from inat.models import build_from_config, create_model
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


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "elu", "tanh", "gelu", "mish"])
def test_pool_before_monotone_activation_is_the_same_function(act):
    """Blocks 1-4 pool before a non-decreasing activation (cheaper); output and gradients equal act -> pool."""
    import torch.nn as nn

    from inat.models.scratch import MONOTONE

    torch.manual_seed(0)
    net = create_model(OmegaConf.structured(ModelConfig(dropout=0.0)), num_classes=5, image_size=64,
                       act=OmegaConf.create({"name": act, "negative_slope": 0.1, "alpha": 1.0}),
                       filters=OmegaConf.structured(FiltersConfig(base=8)))
    net.eval()
    order = [list(dict(b.named_children())) for b in net.blocks]
    assert order[-1][-2:] == ["act", "pool"]  # CONV5's activations stay before pooling (guided backprop)
    assert all(o[-2:] == (["pool", "act"] if act in MONOTONE else ["act", "pool"]) for o in order[:-1])
    reference = nn.Sequential(*[nn.Sequential(*[b.get_submodule(n) for n in ("conv", "bn", "act", "pool")])
                                for b in net.blocks])
    x = torch.randn(4, 3, 64, 64, requires_grad=True)
    a = net.out(net.dense(net.blocks(x)))
    ga, = torch.autograd.grad(a.sum(), x)
    b = net.out(net.dense(reference(x)))
    gb, = torch.autograd.grad(b.sum(), x)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6)
