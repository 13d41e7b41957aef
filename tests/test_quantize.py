"""int8 export: dynamic and static quantization, calibration on the training split, and the accuracy gate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, make_dataset, run_cli
from test_export import export_cfg
from inat.errors import InatError

OUTLIER = 1e5  # a constant channel this large leaves one int8 step of OUTLIER/255 for every other channel


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A scratch run of two epochs on tiny data, trained in-process: (data root, run folder, best.pt)."""
    from omegaconf import OmegaConf

    from inat.config import Config
    from inat.training import fit

    base = tmp_path_factory.mktemp("quant")
    root = make_dataset(base / "data", n_train=40)  # 24 validation images carved from train/
    cfg = OmegaConf.merge(OmegaConf.structured(Config),
                          OmegaConf.from_dotlist([f"data.root={root}", *FAST, "train.epochs=2",
                                                  f"data.cache_dir={base / 'cache'}"]))
    torch.set_num_threads(1)
    fit(cfg, base / "run")
    return root, base / "run", base / "run" / "checkpoints" / "best.pt"


def check_record(q: dict, out: Path) -> None:
    """Both accuracies, sizes and latencies are there and agree with the files."""
    assert q["accepted"] is True and Path(q["path"]) == (out / "model.int8.onnx").resolve()
    assert q["val"]["n"] == 24 and 0 <= q["val"]["int8_accuracy"] <= 1 and 0 <= q["val"]["fp32_accuracy"] <= 1
    assert q["val"]["drop"] == pytest.approx(q["val"]["fp32_accuracy"] - q["val"]["int8_accuracy"])
    assert q["bytes"] == {"fp32": (out / "model.onnx").stat().st_size, "int8": (out / "model.int8.onnx").stat().st_size}
    assert q["latency_ms"]["fp32"] > 0 and q["latency_ms"]["int8"] > 0
    assert q["latency_machine"]["cpu"] and q["latency_machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def run_int8(path: Path, n: int = 3) -> np.ndarray:
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(size=(n, 3, 32, 32)).astype(np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_dynamic_int8_runs_in_onnxruntime_and_says_what_it_quantized(trained_run, tmp_path, capsys):
    import onnx

    from inat.modes.export import run as export_mode

    _, _, ckpt = trained_run
    out = tmp_path / "out"
    export_mode(export_cfg(ckpt, quantize="dynamic"), out)
    printed = capsys.readouterr().out
    assert "validation accuracy on 24 images: fp32" in printed and "CPU latency per image" in printed
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.int8.onnx", "model.onnx"]
    q = json.loads((out / "export.json").read_text())["quantize"]
    check_record(q, out)
    assert q["mode"] == "dynamic" and q["calibration"] is None
    # the five convolutions and both dense layers run as integer ops; nothing heavy is left in float
    assert q["ops"] == {"int8": {"ConvInteger": 5, "MatMulInteger": 2}, "float": {}}
    assert run_int8(out / "model.int8.onnx").shape == (3, 3)
    meta = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
    assert meta["quantize"] == "dynamic" and json.loads(meta["classes"]) == ["class_0", "class_1", "class_2"]


def test_static_int8_calibrates_on_training_split_images_only_and_keeps_accuracy(trained_run, tmp_path):
    from inat.export import export_checkpoint

    root, run, ckpt = trained_run
    out = tmp_path / "out"
    report = export_checkpoint(ckpt, out, quantize="static", calibration_images=20)
    q = report["quantize"]
    check_record(q, out)
    split = json.loads((run / "split.json").read_text())
    train, val = {r["path"] for r in split["train"]}, {r["path"] for r in split["val"]}
    used = q["calibration"]["paths"]
    assert q["calibration"]["n"] == len(used) == len(set(used)) == 20
    assert set(used) <= train and not set(used) & val
    assert all(p.startswith("train/") for p in used)  # root/val/ is this layout's test folder
    assert q["ops"]["int8"] == {"Conv": 5, "Gemm": 2} and q["ops"]["float"] == {}
    assert run_int8(out / "model.int8.onnx", n=5).shape == (5, 3)
    # a normal model keeps its accuracy: the default gate passes
    assert q["val"]["drop"] <= 0.01, q["val"]


def outlier_checkpoint(ckpt: Path, path: Path) -> Path:
    """``ckpt`` with block 1's first channel made a constant OUTLIER that block 2 ignores.

    In fp32 the model loses one of 8 first-block channels and still classifies. Static int8
    gives that activation one per-tensor range, [0, OUTLIER], whose step (OUTLIER / 255) rounds
    every real channel to 0: block 2 sees a constant, and every image gets the same class.
    """
    from inat.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(ckpt)
    for key in ("model", "ema"):
        weights = state.get(key)
        if weights is None:
            continue
        weights = weights.get("module", weights) if "blocks.0.bn.weight" not in weights else weights
        weights["blocks.0.bn.weight"][0] = 0.0
        weights["blocks.0.bn.bias"][0] = OUTLIER
        weights["blocks.1.conv.weight"][:, 0] = 0.0
    save_checkpoint(state, path)
    return path


def test_the_gate_refuses_an_int8_copy_that_loses_accuracy(trained_run, tmp_path):
    _, _, ckpt = trained_run
    broken = outlier_checkpoint(ckpt, tmp_path / "outlier.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.int8.onnx").write_bytes(b"an older export's int8 copy")
    proc = run_cli(["+mode=export", f"ckpt={broken}", "export.quantize=static", f"hydra.run.dir={out}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.int8.onnx was not kept" in proc.stderr and "validation accuracy on 24 images" in proc.stdout
    # no int8 file and no temp file; the verified fp32 export and the record of the refusal stay
    assert sorted(p.name for p in out.iterdir()) == [".hydra", "export.json", "model.onnx", "run.log"]
    assert "Quantization parameters" not in (out / "run.log").read_text()  # ONNX Runtime's per-tensor INFO lines
    q = json.loads((out / "export.json").read_text())["quantize"]
    assert q["accepted"] is False and q["path"] is None and q["max_drop"] == 0.01
    assert q["val"]["drop"] > q["max_drop"]  # a real loss, measured, not a negative threshold
    assert q["val"]["fp32_accuracy"] >= 0.5 and q["val"]["int8_accuracy"] <= 0.5, q["val"]


def test_quantize_is_onnx_only_and_names_its_choices(trained_run, tmp_path):
    from inat.config import config_errors
    from inat.export import export_checkpoint

    _, _, ckpt = trained_run
    with pytest.raises(InatError, match="use export.format=onnx"):
        export_checkpoint(ckpt, tmp_path / "a", fmt="torchscript", quantize="static")
    with pytest.raises(InatError, match="valid are none, dynamic, static"):
        export_checkpoint(ckpt, tmp_path / "b", quantize="int4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    cfg = export_cfg(ckpt, quantize="int4", max_drop=-0.1)
    errors = " ".join(config_errors(cfg))
    assert "export.quantize=int4 is not a valid choice" in errors and "export.max_drop must be >= 0" in errors


def test_without_the_runs_training_folder_no_int8_copy_is_made(trained_run, tmp_path):
    """The gate and the calibration read the run's train/: gone, the command is one sentence, the fp32 export stays."""
    from inat.checkpoint import load_checkpoint, save_checkpoint
    from inat.export import export_checkpoint

    _, _, ckpt = trained_run
    state = load_checkpoint(ckpt)
    state["config"]["data"]["root"] = str(tmp_path / "moved")
    save_checkpoint(state, tmp_path / "moved.pt")
    out = tmp_path / "out"
    with pytest.raises(InatError, match="moved") as err:
        export_checkpoint(tmp_path / "moved.pt", out, quantize="dynamic")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    record = json.loads((out / "export.json").read_text())
    assert record["images"] == "random pixels" and record["quantize"]["accepted"] is False
    assert record["quantize"]["refused"] == str(err.value)


def test_efficientnet_lite0_static_int8_quantizes_every_conv(tmp_path):
    """ImageNet Lite0 with a fresh 3-class head at 224 px: ONNX Runtime's pre-processing and QDQ
    handle its depthwise convolutions and TF-style padding, and the copy is 3-4x smaller."""
    from test_export import make_checkpoint

    from inat.export import export_checkpoint

    data = make_dataset(tmp_path / "data", n_classes=3, n_train=6, n_test=1, size=64)
    ckpt = make_checkpoint(tmp_path / "lite0.pt", ["class_0", "class_1", "class_2"], data, image_size=224,
                           name="efficientnet_lite0", pretrained=True)
    q = export_checkpoint(ckpt, tmp_path / "out", quantize="static", calibration_images=4, max_drop=1.0)["quantize"]
    assert q["accepted"] and q["calibration"]["n"] == 4 and q["val"]["n"] == 3
    assert q["ops"] == {"int8": {"Conv": 49, "Gemm": 1}, "float": {}}
    assert 3 < q["bytes"]["fp32"] / q["bytes"]["int8"] < 4
