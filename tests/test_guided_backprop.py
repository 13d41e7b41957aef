"""Guided backprop: the rule in closed form, hook hygiene, and every activation of the scratch CNN."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from inat.explain.guided_backprop import activation_modules, guided_hooks, neuron_guided_gradient


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def _tiny_mlp(act: nn.Module) -> nn.Sequential:
    """Linear(2->3) -> act -> Linear(3->1) with hand-picked weights."""
    net = nn.Sequential(nn.Linear(2, 3), act, nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0], [3.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[2.0, -1.0, -3.0]]))
        net[2].bias.zero_()
    return net


def _input_grad(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(x).sum(), x)
    return g


def test_relu_rule_in_closed_form():
    # x = (1, 1): h = W1 x = (3, 0, 2) -> active units 0 and 2 (unit 1 sits at exactly 0: inactive).
    # Plain gradient: W1^T (w2 * [h > 0]) = W1^T (2, 0, -3) = (2 - 9, 4 + 3) = (-7, 7).
    # Guided: W1^T (relu(w2) * [h > 0]) = W1^T (2, 0, 0) = (2, 4): the negative path through unit 2 is cut.
    net = _tiny_mlp(nn.ReLU())
    x = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(_input_grad(net, x), torch.tensor([[-7.0, 7.0]]))
    with guided_hooks(net):
        guided = _input_grad(net, x)
    assert torch.allclose(guided, torch.tensor([[2.0, 4.0]]))
    assert torch.allclose(_input_grad(net, x), torch.tensor([[-7.0, 7.0]]))  # model restored


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Mish(), nn.ELU(), nn.LeakyReLU(0.1), nn.SELU(), nn.Tanh()],
                         ids=lambda m: type(m).__name__)
def test_generic_rule_in_closed_form(act):
    # x = (1, -0.5): h = (0, -1.5, 3.5). Only unit 2 has h > 0; its local gradient is
    # w2[2] * f'(3.5) = -3 f'(3.5) < 0, so the guided rule clamps it to 0 -> zero gradient.
    # x = (1, 1): h = (3, 0, 2): units 0 and 2 positive; guided = W1^T (clamp(w2 * f'(h), 0) * [h > 0])
    #           = W1[0] * 2 f'(3).
    net = _tiny_mlp(act)
    with guided_hooks(net):
        assert torch.allclose(_input_grad(net, torch.tensor([[1.0, -0.5]])), torch.zeros(1, 2))
        guided = _input_grad(net, torch.tensor([[1.0, 1.0]]))
    h = torch.tensor(3.0, requires_grad=True)
    (slope,) = torch.autograd.grad(act(h), h)
    assert torch.allclose(guided, torch.tensor([[1.0, 2.0]]) * 2 * slope, atol=1e-6)


def test_hooks_removed_after_use_and_after_an_exception():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True), nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 1))
    assert _hooks(net) == 0
    with guided_hooks(net) as hooked:
        assert len(hooked) == 2 and _hooks(net) > 0
        assert net[1].inplace is False  # full backward hooks cannot wrap an in-place op
    assert _hooks(net) == 0 and net[1].inplace is True
    with pytest.raises(RuntimeError, match="boom"):
        with guided_hooks(net):
            net(torch.ones(1, 2))
            raise RuntimeError("boom")
    assert _hooks(net) == 0 and net[1].inplace is True


def _scratch(act: str, size: int = 32):
    from inat.config import Config
    from inat.models import build_from_config

    cfg = OmegaConf.structured(Config)
    cfg.data.image_size = size
    cfg.act.name = act
    cfg.filters.base = 4
    cfg.model.dense_units = 8
    torch.manual_seed(0)
    return build_from_config(cfg, 3).eval()


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "mish", "elu", "leaky_relu", "selu", "tanh", "sigmoid", "hardswish"])
def test_every_scratch_activation(act):
    model = _scratch(act)
    x = torch.randn(2, 3, 32, 32)
    grad = neuron_guided_gradient(model, x, channel=1)
    assert grad.shape == (2, 3, 32, 32) and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert _hooks(model) == 0 and len(activation_modules(model)) == 6
    assert all(p.grad is None for p in model.parameters())  # parameters untouched


def test_guided_differs_from_plain_gradient_and_targets_the_neuron():
    model = _scratch("relu")
    x = torch.randn(1, 3, 32, 32)
    x1 = x.clone().requires_grad_(True)
    captured = []
    h = model.last_conv().register_forward_hook(lambda _m, _i, o: captured.append(o))
    model(x1)
    h.remove()
    channel = int(captured[0].amax(dim=(0, 2, 3)).argmax())  # a live neuron (ReLU may leave some at 0)
    (plain,) = torch.autograd.grad(captured[0][:, channel].amax(), x1)
    guided = neuron_guided_gradient(model, x, channel=channel)
    # Same objective, but negative paths removed: nonzero, and not the plain gradient.
    assert guided.abs().sum() > 0 and plain.abs().sum() > 0
    assert not torch.allclose(guided, plain)
