"""Guided backpropagation of single CONV5 neurons, for any activation function.

The rule (Springenberg et al. 2015) is applied at every activation module through a full
backward hook. For an activation ``y = f(x)`` autograd hands the hook
``g = dL/dx = f'(x) * dL/dy``; the hook replaces it with

    guided(g) = clamp(g, min=0) * (x > 0)

For ReLU, ``g = dL/dy * (x > 0)``, so this is exactly the classic rule
``relu(dL/dy) * (x > 0)``. For smooth activations (GELU, SiLU, Mish, ELU, LeakyReLU, SELU,
Tanh, Sigmoid, Hardswish, ...) it keeps the activation's own local slope ``f'(x)`` where the
input was positive and the incoming signal positive, and zeroes the rest, so only positive
evidence flows back, as with ReLU. (For f with f'(x) > 0 at x > 0, which holds for all of
the above, it equals ``relu(dL/dy) * f'(x) * (x > 0)``.)

Hooks are installed by the context manager ``guided_hooks``, which removes them (and puts
back any ``inplace=True`` flags it had to turn off, since full backward hooks cannot wrap an
in-place op) when the block ends, also when it ends with an exception.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
import torch.nn as nn

from inat.errors import InatError
from inat.explain.scoring import model_device, normalise
from inat.models.base import InatModel, ModelSpec

# Module types treated as activations. Activations called through torch.nn.functional
# inside a forward() are invisible to hooks; the scratch CNN and torchvision/timm backbones
# use modules.
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.LeakyReLU, nn.PReLU,
                    nn.SELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus)


def activation_modules(model: nn.Module) -> List[nn.Module]:
    """Every activation module of ``model`` (each is hooked once, however often it is called)."""
    return [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]


@contextlib.contextmanager
def guided_hooks(model: nn.Module) -> Iterator[List[nn.Module]]:
    """Install the guided rule on every activation of ``model`` for the ``with`` block.

    A module called several times in one forward pass (torchvision's ResNet reuses one ReLU
    per block) gets a stack of inputs: backward visits its calls in reverse order.
    Yields the hooked modules. Everything is undone on exit, even after an exception.
    """
    modules = activation_modules(model)
    inputs: Dict[int, List[torch.Tensor]] = {id(m): [] for m in modules}
    handles = []
    inplace_was: Dict[int, bool] = {}

    def remember_input(module: nn.Module, args: tuple) -> None:
        inputs[id(module)].append(args[0].detach())

    def guide(module: nn.Module, grad_input: tuple, grad_output: tuple):
        stack = inputs[id(module)]
        if grad_input[0] is None:
            return None
        # Calls after the objective (e.g. the head's activation) never get a backward, so
        # skip remembered inputs whose shape cannot belong to this gradient.
        while stack and stack[-1].shape != grad_input[0].shape:
            stack.pop()
        if not stack:
            return None
        x = stack.pop()
        return (grad_input[0].clamp(min=0) * (x > 0).to(grad_input[0].dtype),) + tuple(grad_input[1:])

    try:
        for m in modules:
            if getattr(m, "inplace", False):
                inplace_was[id(m)] = True
                m.inplace = False
            handles.append(m.register_forward_pre_hook(remember_input))
            handles.append(m.register_full_backward_hook(guide))
        yield modules
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            if inplace_was.get(id(m)):
                m.inplace = True
        inputs.clear()


def neuron_guided_gradient(model: InatModel, x: torch.Tensor, channel: int) -> torch.Tensor:
    """Guided gradient of one CONV5 channel's maximum spatial activation w.r.t. the input.

    ``x`` is a normalised (B, 3, H, W) batch; returns (B, 3, H, W). The objective is the
    neuron itself (``max_{h,w} CONV5[b, channel, h, w]``), not a class logit; the forward
    pass still runs the whole model so the hooks see the same graph the classifier uses.
    Parameter gradients are not touched (``torch.autograd.grad`` on the input only).
    """
    was_training = model.training
    model.eval()
    captured: List[torch.Tensor] = []
    handle = model.last_conv().register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with guided_hooks(model), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            model(x)
            conv5 = captured[-1]  # (B, C5, h, w)
            target = conv5[:, channel].flatten(1).amax(dim=1).sum()  # one neuron per image
            (grad,) = torch.autograd.grad(target, x)
    finally:
        handle.remove()
        model.train(was_training)
    return grad.detach()  # (B, 3, H, W)


def pick_neurons(conv5_max: np.ndarray, count: int, neurons: Sequence[int] | None = None) -> List[int]:
    """The channels to show: ``neurons`` as given, else the ``count`` with the highest mean max-activation."""
    n_channels = conv5_max.shape[1]
    if neurons:
        bad = [n for n in neurons if not 0 <= int(n) < n_channels]
        if bad:
            raise InatError(f"explain.neurons {bad} are out of range: CONV5 has {n_channels} channels (0..{n_channels - 1}).")
        return [int(n) for n in neurons]
    order = np.argsort(-conv5_max.mean(0), kind="stable")
    return [int(c) for c in order[:min(count, n_channels)]]


def gradient_to_image(grad: torch.Tensor) -> np.ndarray:
    """(3, H, W) gradient -> (H, W, 3) floats in [0, 1] for display.

    Centred on 0.5 and scaled by a few standard deviations (the usual guided-backprop
    rendering), so faint structure is visible and one hot pixel does not wash it out.
    """
    g = grad.detach().float().cpu().numpy().transpose(1, 2, 0)  # (H, W, 3)
    g = g - g.mean()
    g = g / (g.std() + 1e-12) * 0.15 + 0.5
    return np.clip(g, 0.0, 1.0)


def draw_guided_backprop(model: InatModel, spec: ModelSpec, scores, out: Path, neurons: Sequence[int] | None = None,
                         count: int = 10) -> Dict:
    """Figure: for each chosen CONV5 neuron, the test image exciting it most and its guided gradient.

    ``scores`` is a ``TestScores``. Writes an (n x 2) grid to ``out`` and returns what was
    shown (neuron, image path, activation) for explain.json.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = pick_neurons(scores.conv5_max, count, neurons)
    best = [int(scores.conv5_max[:, c].argmax()) for c in chosen]  # image index per neuron
    x = normalise(scores.images[best], spec, model_device(model))  # (n, 3, S, S), where the model is
    grads = torch.cat([neuron_guided_gradient(model, x[i:i + 1], c) for i, c in enumerate(chosen)])
    fig, axes = plt.subplots(len(chosen), 2, figsize=(4.2, 2.1 * len(chosen) + 0.45), squeeze=False)
    rows = []
    for r, (c, i) in enumerate(zip(chosen, best)):
        act = float(scores.conv5_max[i, c])
        axes[r, 0].imshow(scores.images[i])
        axes[r, 0].set_title(f"neuron {c}: {scores.classes[scores.labels[i]]}", fontsize=8)
        axes[r, 1].imshow(gradient_to_image(grads[r]))
        axes[r, 1].set_title(f"guided backprop (max act {act:.2f})", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        rows.append({"neuron": c, "image": str(scores.paths[i]), "activation": act})
    fig.suptitle("CONV5 neurons: the test image\nexciting each most, guided backprop", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.1 * len(chosen) + 0.45)))  # leave the suptitle its own band
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return {"neurons": rows}
