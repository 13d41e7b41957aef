"""Freezing strategies for fine-tuning, driven only by the InatModel interface.

``finetune.strategy``:

- ``none``: everything trains (training from scratch).
- ``linear_probe``: only the new head trains; the backbone is a fixed feature extractor,
  so ``features_and_head`` lets the loop compute its features once per image.
- ``partial``: the first ``finetune.k`` layer groups are frozen, the rest train.
- ``gradual``: epoch 0 trains the head only; one more group from the top is unfrozen every
  ``finetune.every`` epochs until all train (ULMFiT-style).
- ``full``: everything trains, with discriminative learning rates: group i of n gets
  ``lr * lr_decay ** (n - 1 - i)`` so the head gets ``lr`` and the stem the smallest.

``finetune.bn`` decides what BatchNorm does: ``freeze_frozen`` keeps BN layers of frozen
groups in eval mode (their running statistics stay the ImageNet ones, matching the frozen
weights around them), ``train_all`` lets every BN update its statistics, ``freeze_all``
keeps every BN in eval mode (small batches or a dataset close to ImageNet). BN affine
parameters still follow their group's freezing.

The loop calls: ``setup_finetune`` once, ``param_groups`` for the optimizer,
``on_epoch_start`` each epoch, ``set_train_mode`` instead of ``model.train()``.

Cached fast paths: ``features_and_head`` (linear probe: any model, split at its head by a
hook) and ``split_at`` (partial: models whose forward is a plain chain of modules, split
between layer groups) let the loop compute the frozen part's output once.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from inat.choices import BN_POLICIES, FINETUNE_STRATEGIES
from inat.errors import InatError
from inat.models.base import InatModel

STRATEGIES = FINETUNE_STRATEGIES


def _group_params(model: InatModel) -> List[List[nn.Parameter]]:
    """Parameters of each layer group (input -> head); any parameter no group names joins the first.

    Parameters reachable from two groups count once, in the first; parameters outside every
    group (a ViT's class token, say) sit at the input end, so they go with the stem.
    """
    seen: set[int] = set()
    groups: List[List[nn.Parameter]] = []
    for module in model.layer_groups():
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append(params)
    if not groups:
        raise InatError(f"{type(model).__name__} has no layer groups; fine-tuning needs them.")
    groups[0] = [p for p in model.parameters() if id(p) not in seen] + groups[0]
    return groups


def _group_names(model: InatModel, n: int) -> List[str]:
    names = getattr(model, "group_names", None)
    return list(names()) if callable(names) else [f"group{i}" for i in range(n - 1)] + ["head"]


def check_finetune(model: InatModel, ft_cfg: Any) -> int:
    """Validate the finetune section against this model; returns its number of layer groups."""
    strategy, bn = ft_cfg.strategy, ft_cfg.bn
    if strategy not in STRATEGIES:
        raise InatError(f"Unknown finetune.strategy '{strategy}': valid are {', '.join(STRATEGIES)}.")
    if bn not in BN_POLICIES:
        raise InatError(f"Unknown finetune.bn '{bn}': valid are {', '.join(BN_POLICIES)}.")
    n = len(model.layer_groups())
    if strategy == "partial" and not 0 <= int(ft_cfg.k) <= n - 1:
        names = ", ".join(_group_names(model, n))
        raise InatError(f"finetune.k={ft_cfg.k} is out of range: this model has {n} layer groups ({names}), "
                        f"so k must be 0..{n - 1} (the head always trains).")
    if strategy == "gradual" and int(ft_cfg.every) < 1:
        raise InatError(f"finetune.every must be a positive number of epochs, got {ft_cfg.every}.")
    if strategy == "full" and not 0.0 < float(ft_cfg.lr_decay) <= 1.0:
        raise InatError(f"finetune.lr_decay must be in (0, 1], got {ft_cfg.lr_decay}.")
    return n


def _first_trainable(ft_cfg: Any, n: int, epoch: int) -> int:
    """Index of the lowest layer group that trains at ``epoch`` (groups below it are frozen)."""
    strategy = ft_cfg.strategy
    if strategy == "linear_probe":
        return n - 1
    if strategy == "partial":
        return int(ft_cfg.k)
    if strategy == "gradual":
        return max(0, n - 1 - epoch // int(ft_cfg.every))
    return 0  # none, full


def _ever_trainable(ft_cfg: Any, n: int) -> int:
    # gradual reaches group 0 eventually; only linear_probe and partial keep groups frozen for good.
    return _first_trainable(ft_cfg, n, epoch=0) if ft_cfg.strategy in ("linear_probe", "partial") else 0


def setup_finetune(model: InatModel, ft_cfg: Any) -> None:
    """Validate the strategy and freeze for epoch 0; a no-op for ``strategy=none``."""
    check_finetune(model, ft_cfg)
    if ft_cfg.strategy != "none":
        on_epoch_start(model, ft_cfg, 0)


def on_epoch_start(model: InatModel, ft_cfg: Any, epoch: int) -> None:
    """Set ``requires_grad`` per the schedule at ``epoch`` (0-based); gradual unfreezes here."""
    if ft_cfg.strategy == "none":
        return
    groups = _group_params(model)
    first = _first_trainable(ft_cfg, len(groups), epoch)
    for i, params in enumerate(groups):
        for p in params:
            p.requires_grad_(i >= first)


def param_groups(model: InatModel, ft_cfg: Any, base_lr: float, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: every parameter that may ever train, each with its 'lr'.

    One pair per layer group (weights with ``weight_decay``; norm and bias parameters, the
    1-D ones, without: decaying a BN scale or a bias only fights the normalisation). With
    ``full`` the lr falls by ``lr_decay`` per group below the head. Extra keys 'name' and
    'initial_lr'-free dicts are plain torch param groups. A schedule that sets one max lr
    (OneCycleLR) must get the list ``[g['lr'] for g in groups]`` to keep them discriminative.
    """
    n = check_finetune(model, ft_cfg)
    groups = _group_params(model)
    names = _group_names(model, n)
    out: List[Dict[str, Any]] = []
    for i in range(_ever_trainable(ft_cfg, n), n):
        lr = base_lr * float(ft_cfg.lr_decay) ** (n - 1 - i) if ft_cfg.strategy == "full" else base_lr
        decay = [p for p in groups[i] if p.ndim > 1]
        no_decay = [p for p in groups[i] if p.ndim <= 1]
        if decay:
            out.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": names[i]})
        if no_decay:
            out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{names[i]}.no_decay"})
    return out


def _batch_norms(module: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: InatModel, ft_cfg: Any) -> None:
    """``model.train()``, then BN layers the ``finetune.bn`` policy freezes back to eval mode.

    Call it instead of ``model.train()`` at the start of every epoch (after
    ``on_epoch_start``): which groups are frozen is read from ``requires_grad``.
    """
    model.train()
    if ft_cfg.strategy == "none" or ft_cfg.bn == "train_all":
        return
    if ft_cfg.bn == "freeze_all":
        for bn in _batch_norms(model):
            bn.eval()
        return
    for module, params in zip(model.layer_groups(), _group_params(model)):
        if params and not any(p.requires_grad for p in params):
            for bn in _batch_norms(module):
                bn.eval()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` right now."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def features_and_head(model: InatModel) -> Tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """Split a model at its head: ``(backbone_fn, head)`` with ``head(backbone_fn(x)) == model(x)``.

    ``backbone_fn`` returns the head's input, the penultimate features (B, D), captured with
    a hook so it works for any backbone without knowing its pooling. For the linear-probe
    fast path call it once per image with ``model.eval()`` under ``torch.no_grad()`` (no
    augmentation), then train ``head`` alone on the cached features.
    """
    head = model.head()

    def backbone_fn(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        captured: List[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            model(x)
        finally:
            handle.remove()
        assert len(captured) == 1, "the head must run exactly once per forward"
        return captured[0]

    return backbone_fn, head


def split_at(model: InatModel, k: int, check: bool = True) -> Tuple[nn.Sequential, nn.Sequential]:
    """Cut a model between layer groups ``k - 1`` and ``k``: ``suffix(prefix(x)) == model(x)``.

    Only for models whose ``chain()`` lists the forward pass as modules run in sequence
    (EfficientNet-Lite, torchvision ResNets). Both halves share the model's modules (no
    copies), so training the suffix trains the model. With ``check`` one small eval-mode
    forward proves the cut reproduces the model's logits.
    """
    chain_fn = getattr(model, "chain", None)
    chain = chain_fn() if callable(chain_fn) else None
    if not chain:
        raise InatError(f"{getattr(model, 'spec', None) and model.spec.name or type(model).__name__} cannot be cut "
                        f"into a frozen prefix and a trained suffix (its forward is not a plain chain of layers); "
                        f"set finetune.cache_views=0 to fine-tune on images.")
    groups = model.layer_groups()
    if not 1 <= k <= len(groups) - 1:
        raise InatError(f"Cannot cut this model before layer group {k}: k must be 1..{len(groups) - 1}.")
    owner = {}
    for i, module in enumerate(groups):
        for sub in module.modules():
            owner.setdefault(id(sub), i)
    cut = 0
    for j, (_, module) in enumerate(chain):
        group = owner.get(id(module))
        if group is not None and group < k:
            cut = j + 1
    for j, (name, module) in enumerate(chain):
        group = owner.get(id(module))
        if group is not None and (group < k) != (j < cut):
            raise InatError(f"Layer '{name}' of group {group} lies on the wrong side of the cut before group {k}.")
    prefix = nn.Sequential(*[m for _, m in chain[:cut]])
    suffix = nn.Sequential(*[m for _, m in chain[cut:]])
    if check:
        _check_split(model, prefix, suffix)
    return prefix, suffix


@torch.no_grad()
def _check_split(model: InatModel, prefix: nn.Module, suffix: nn.Module) -> None:
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 64, 64, generator=gen).to(param.device, param.dtype)
        whole, cut = model(x), suffix(prefix(x))
    finally:
        model.train(was_training)
    if whole.shape != cut.shape or not torch.allclose(whole, cut, rtol=1e-4, atol=1e-4):
        raise InatError(f"Cutting {model.spec.name} into prefix and suffix changes its output; "
                        f"set finetune.cache_views=0 to fine-tune on images.")
