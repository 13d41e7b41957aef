"""Export mode: ONNX and TorchScript parity with PyTorch, metadata, dynamic batch, atomic failure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_dataset
from inat.checkpoint import save_checkpoint
from inat.config import Config
from inat.errors import InatError

CLASSES = ["class_0", "class_1", "class_2"]
FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def make_checkpoint(path: Path, classes, data_root: Path, image_size: int = 32, seed: int = 0, **model) -> Path:
    """A checkpoint with seeded random head/weights for ``model`` overrides (scratch by default)."""
    from inat.models import build_from_config

    cfg = OmegaConf.to_container(OmegaConf.structured(Config))
    cfg["data"]["root"] = str(data_root)
    cfg["data"]["image_size"] = image_size
    cfg["filters"]["base"] = 8
    cfg["model"].update(model)
    torch.manual_seed(seed)
    net = build_from_config(OmegaConf.create(cfg), len(classes))
    # Non-trivial BatchNorm statistics, so eval-mode export is really tested (fresh BN is identity).
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    save_checkpoint({"config": cfg, "classes": list(classes), "model": net.state_dict(), "ema": None}, path)
    return path


def export_cfg(ckpt: Path, **export):
    cfg = OmegaConf.structured(Config)
    cfg.ckpt = str(ckpt)
    for key, value in export.items():
        cfg.export[key] = value
    return cfg


@pytest.fixture
def scratch_ckpt(tmp_path) -> Path:
    data = make_dataset(tmp_path / "data", n_classes=3, n_train=4, n_test=1, size=40)
    return make_checkpoint(tmp_path / "best.pt", CLASSES, data)


def test_scratch_onnx_export_matches_pytorch_and_carries_its_preprocessing(scratch_ckpt, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from inat.data.images import decode_image, to_float
    from inat.modes.export import run as export_mode
    from inat.models import model_from_checkpoint

    out = tmp_path / "out"
    export_mode(export_cfg(scratch_ckpt), out)
    assert "max |logit difference|" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == "onnx" and report["opset"] == 17 and report["n_images"] == 8
    assert Path(report["path"]) == (out / "model.onnx").resolve()
    assert "train" in report["images"]  # real images from the run's own train folder
    assert 0 <= report["max_abs_diff"] < 1e-4

    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert int(meta["input_size"]) == 32 and meta["interpolation"] == "bilinear"
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])

    # A consumer with only the .onnx file: preprocess from the metadata, any batch size.
    image = tmp_path / "data" / "val" / "class_1" / "val_1_0.png"
    size, mean, std = int(meta["input_size"]), json.loads(meta["mean"]), json.loads(meta["std"])
    pixels = np.array(decode_image(image, size, meta["interpolation"], float(meta["crop_pct"])))
    x = to_float(torch.from_numpy(np.stack([pixels] * 5)), mean, std).numpy()  # (5, 3, 32, 32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {meta["input_name"]: x})[0]
    model, _, _ = model_from_checkpoint(scratch_ckpt)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert logits.shape == (5, 3) and np.abs(logits - expected).max() < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_export_matches_pytorch(scratch_ckpt, tmp_path):
    from inat.export import export_checkpoint

    out = tmp_path / "out"
    report = export_checkpoint(scratch_ckpt, out, fmt="torchscript", verify_images=3)
    assert (out / "model.torchscript.pt").is_file() and report["opset"] is None
    assert report["max_abs_diff"] < 1e-4 and report["n_images"] == 3
    extra = {"inat.json": ""}
    torch.jit.load(str(out / "model.torchscript.pt"), _extra_files=extra)
    assert json.loads(json.loads(extra["inat.json"])["classes"]) == CLASSES


def test_failed_parity_leaves_nothing_behind(scratch_ckpt, tmp_path):
    from inat.export import export_checkpoint

    out = tmp_path / "out"
    with pytest.raises(InatError, match="above the -1 tolerance; nothing was written"):
        export_checkpoint(scratch_ckpt, out, tolerance=-1.0)  # no difference passes a negative tolerance
    assert list(out.iterdir()) == []
    with pytest.raises(InatError, match="valid are onnx, torchscript"):
        export_checkpoint(scratch_ckpt, out, fmt="tflite")


def test_efficientnet_lite0_with_a_replaced_head_exports_with_parity(tmp_path):
    """ImageNet Lite0 weights from the pip package, a fresh 5-class head, 224 px, mean = std = 0.5.

    No data root: the parity check falls back to random pixels. An unknown model name or a
    missing weights package fails this test rather than skipping it.
    """
    import onnx

    from inat.export import export_checkpoint

    ckpt = make_checkpoint(tmp_path / "lite0.pt", FLOWERS, tmp_path / "no_data", image_size=224,
                           name="efficientnet_lite0", pretrained=True)
    out = tmp_path / "out"
    report = export_checkpoint(ckpt, out, verify_images=4)
    assert report["images"] == "random pixels" and report["max_abs_diff"] < 1e-3
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == FLOWERS and meta["model"] == "efficientnet_lite0"
    assert int(meta["input_size"]) == 224 and meta["interpolation"] == "bicubic"
    assert json.loads(meta["mean"]) == pytest.approx([0.5] * 3) and json.loads(meta["std"]) == pytest.approx([0.5] * 3)
