"""Freezing strategies: who gets gradients, learning rates per group, BN statistics, the probe split."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from inat.config import FinetuneConfig, ModelConfig
from inat.errors import InatError
from inat.models import create_model
from inat.models.freeze import (features_and_head, on_epoch_start, param_groups, set_train_mode, setup_finetune,
                                trainable_parameters)

N_GROUPS = 6  # resnet18: stem, layer1..layer4, head


def resnet18(classes: int = 5):
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name="torchvision", arch="resnet18", pretrained=False))
    return create_model(cfg, num_classes=classes, image_size=32)


def ft(**kw):
    return OmegaConf.structured(FinetuneConfig(**kw))


def group_has_grad(model) -> list:
    """Per layer group: True if every parameter got a gradient, False if none did."""
    out = []
    for group in model.layer_groups():
        grads = [p.grad is not None for p in group.parameters()]
        assert all(grads) or not any(grads), "a group is either trained or frozen as a whole"
        out.append(all(grads))
    return out


def backward_once(model, cfg, epoch: int = 0) -> None:
    on_epoch_start(model, cfg, epoch)
    set_train_mode(model, cfg)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()


@pytest.mark.parametrize("cfg,epoch,expected", [
    (ft(strategy="none"), 0, [True] * 6),
    (ft(strategy="linear_probe"), 0, [False] * 5 + [True]),
    (ft(strategy="partial", k=3), 0, [False] * 3 + [True] * 3),
    (ft(strategy="partial", k=0), 0, [True] * 6),
    (ft(strategy="gradual", every=1), 0, [False] * 5 + [True]),
    (ft(strategy="gradual", every=1), 2, [False] * 3 + [True] * 3),
    (ft(strategy="gradual", every=2), 3, [False] * 4 + [True] * 2),
    (ft(strategy="gradual", every=1), 9, [True] * 6),
    (ft(strategy="full"), 0, [True] * 6),
])
def test_which_groups_get_gradients(cfg, epoch, expected):
    model = resnet18()
    setup_finetune(model, cfg)
    backward_once(model, cfg, epoch)
    assert group_has_grad(model) == expected


def test_param_groups_lr_and_weight_decay():
    model = resnet18()
    cfg = ft(strategy="full", lr_decay=0.5)
    setup_finetune(model, cfg)
    groups = param_groups(model, cfg, base_lr=1e-2, weight_decay=0.05)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(1e-2) and lrs["layer4"] == pytest.approx(5e-3)
    assert lrs["stem"] == pytest.approx(1e-2 * 0.5 ** 5)
    for g in groups:
        one_d = all(p.ndim <= 1 for p in g["params"])
        assert g["weight_decay"] == (0.0 if one_d else 0.05)  # norm and bias params never decay
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-2)  # torch accepts them as they are


@pytest.mark.parametrize("cfg,n_params", [
    (ft(strategy="linear_probe"), 512 * 5 + 5),
    (ft(strategy="partial", k=4), None),
])
def test_param_groups_hold_only_what_may_train(cfg, n_params):
    model = resnet18()
    setup_finetune(model, cfg)
    groups = param_groups(model, cfg, base_lr=1e-3, weight_decay=0.0)
    in_groups = sum(p.numel() for g in groups for p in g["params"])
    assert in_groups == trainable_parameters(model)
    if n_params is not None:
        assert in_groups == n_params
    assert {g["lr"] for g in groups} == {1e-3}


def test_gradual_param_groups_include_groups_unfrozen_later():
    model = resnet18()
    cfg = ft(strategy="gradual", every=1)
    setup_finetune(model, cfg)
    assert trainable_parameters(model) == 512 * 5 + 5
    groups = param_groups(model, cfg, base_lr=1e-3, weight_decay=0.0)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def bn_stats(model):
    return [[m.running_mean.clone() for m in group.modules() if isinstance(m, nn.BatchNorm2d)]
            for group in model.layer_groups()]


@pytest.mark.parametrize("bn,moved", [
    ("freeze_frozen", [False, False, False, True, True]),  # stem, layer1, layer2 frozen (k=3)
    ("freeze_all", [False] * 5),
    ("train_all", [True] * 5),
])
def test_bn_running_stats_follow_the_policy(bn, moved):
    model = resnet18()
    cfg = ft(strategy="partial", k=3, bn=bn)
    setup_finetune(model, cfg)
    opt = torch.optim.SGD(param_groups(model, cfg, base_lr=0.1, weight_decay=0.0), lr=0.1)
    before = bn_stats(model)
    for _ in range(3):
        backward_once(model, cfg)
        opt.step()
    after = bn_stats(model)
    changed = [any(not torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(before[:5], after[:5])]
    assert changed == moved
    set_train_mode(model, cfg)
    assert model.training and model.net.fc.training


def test_features_then_head_equals_forward():
    for model in (resnet18(), create_model(OmegaConf.structured(ModelConfig(name="efficientnet_lite0", pretrained=False)),
                                           num_classes=5, image_size=64)):
        model.eval()
        x = torch.randn(3, 3, 64, 64)
        backbone_fn, head = features_and_head(model)
        with torch.no_grad():
            feats = backbone_fn(x)
            assert feats.shape == (3, head.in_features)
            torch.testing.assert_close(head(feats), model(x))


def test_scratch_with_strategy_none_trains_everything():
    cfg = OmegaConf.structured(ModelConfig())
    filters = OmegaConf.create({"organisation": "same", "base": 8, "custom": None})
    model = create_model(cfg, num_classes=3, image_size=32, filters=filters)
    none = ft(strategy="none")
    setup_finetune(model, none)
    groups = param_groups(model, none, base_lr=1e-3, weight_decay=0.05)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable_parameters(model)
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters())


def test_bad_settings_name_the_valid_choices():
    model = resnet18()
    with pytest.raises(InatError, match="k must be 0..5"):
        setup_finetune(model, ft(strategy="partial", k=6))
    with pytest.raises(InatError, match="valid are none, linear_probe, partial, gradual, full"):
        setup_finetune(model, ft(strategy="probe"))
    with pytest.raises(InatError, match="valid are freeze_frozen, train_all, freeze_all"):
        setup_finetune(model, ft(strategy="full", bn="frozen"))
