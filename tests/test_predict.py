"""Predict mode: folders with a corrupt file, the JSONL schema, the run's preprocessing, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_dataset, run_cli
from inat.checkpoint import save_checkpoint
from inat.errors import InatError

CLASSES = ["class_0", "class_1", "class_2"]


def make_checkpoint(path: Path, data_root: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A scratch-CNN checkpoint with seeded random weights, as a training run would save it."""
    from omegaconf import OmegaConf  # here, not at module level: a machine without it still collects this file

    from inat.config import Config
    from inat.models import build_from_config

    cfg = OmegaConf.to_container(OmegaConf.structured(Config))
    cfg["data"]["root"] = str(data_root)
    cfg["data"]["image_size"] = image_size
    cfg["filters"]["base"] = 8
    torch.manual_seed(seed)
    model = build_from_config(OmegaConf.create(cfg), len(CLASSES))
    save_checkpoint({"config": cfg, "classes": CLASSES, "model": model.state_dict(), "ema": None}, path)
    return path


@pytest.fixture
def setup(tmp_path):
    """A checkpoint plus an input folder: PNGs in nested class folders, one corrupt JPEG, a stray text file."""
    data = make_dataset(tmp_path / "data", n_classes=3, n_train=3, n_test=1)
    ckpt = make_checkpoint(tmp_path / "best.pt", data)
    inputs = data / "train"
    (inputs / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inputs / "notes.txt").write_text("not an image, and not an image extension: never picked up")
    return ckpt, inputs


def predict_cfg(ckpt: Path, inputs, **predict):
    from omegaconf import OmegaConf

    from inat.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.ckpt = str(ckpt)
    cfg.predict.inputs = [str(p) for p in inputs]
    for key, value in predict.items():
        cfg.predict[key] = value
    return cfg


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_with_a_corrupt_file_warns_counts_and_scores_the_rest(setup, tmp_path, capsys):
    from inat.modes.predict import run as predict_mode

    ckpt, inputs = setup
    out = tmp_path / "out"
    predict_mode(predict_cfg(ckpt, [inputs], top_k=2, batch_size=4), out)  # 4: several chunks, one ragged
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    assert "scored 9 image(s); skipped 1 unreadable file(s)" in captured.out
    records = read_jsonl(out / "predictions.jsonl")
    assert len(records) == 9
    assert not any("broken" in r["path"] or "notes" in r["path"] for r in records)
    # one printed line per scored image, naming its top-2 classes
    printed = [line for line in captured.out.splitlines() if line.endswith(tuple("0123456789"))]
    assert len(printed) == 9 and printed[0].startswith(records[0]["path"] + ": ")
    assert not list(out.glob("*.tmp"))


def test_jsonl_schema_and_the_checkpoints_preprocessing(setup, tmp_path):
    from inat.data.images import decode_image, to_float
    from inat.models import model_from_checkpoint
    from inat.modes.predict import run as predict_mode

    ckpt, inputs = setup
    image = inputs / "class_2" / "train_2_0.png"
    out = tmp_path / "out"
    predict_mode(predict_cfg(ckpt, [image, inputs / "class_0"], top_k=5), out)  # top_k above the class count
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["path"] for r in records] == [str(image)] + sorted(str(p) for p in (inputs / "class_0").glob("*.png"))
    for r in records:
        assert set(r) == {"path", "class", "probability", "top_k"}
        assert len(r["top_k"]) == len(CLASSES)  # clamped to the classes there are
        assert all(set(t) == {"class", "probability"} for t in r["top_k"])
        probs = [t["probability"] for t in r["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert {t["class"] for t in r["top_k"]} == set(CLASSES)
        assert (r["class"], r["probability"]) == (r["top_k"][0]["class"], r["top_k"][0]["probability"])
    # the probabilities are the model's on the spec's preprocessing, decoded exactly as the run did
    model, spec, classes = model_from_checkpoint(ckpt)
    pixels = np.array(decode_image(image, spec.input_size, spec.interpolation))[None]  # (1, S, S, 3)
    x = to_float(torch.from_numpy(pixels), spec.mean, spec.std)
    with torch.no_grad():
        expected = model(x).softmax(1)[0]
    got = {t["class"]: t["probability"] for t in records[0]["top_k"]}
    # predict runs under the process's precision policy: fp32 here, bf16/fp16 on a GPU that has it
    from inat.inference import pick_device, process_precision

    atol = 2e-6 if process_precision("auto", pick_device(), announce=False).name == "32" else 2e-2
    assert np.allclose([got[c] for c in classes], expected.numpy(), atol=atol)


def test_tta_changes_nothing_but_the_scores(setup, tmp_path):
    from inat.predict import predict_images

    ckpt, inputs = setup
    result = predict_images(ckpt, [inputs / "class_0"], tmp_path / "out", tta=True, echo=False)
    assert len(result.records) == 3 and not result.skipped


def test_missing_input_and_empty_folder_are_one_sentence_errors(setup, tmp_path):
    from inat.predict import predict_images

    ckpt, inputs = setup
    with pytest.raises(InatError, match="does not exist"):
        predict_images(ckpt, [inputs, tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InatError, match="No image files"):
        predict_images(ckpt, [tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(InatError, match="predict.inputs"):
        predict_images(ckpt, [], tmp_path / "out")
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_nothing_scored_exits_non_zero_with_a_sentence(setup, tmp_path):
    ckpt, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"garbage")
    (bad / "b.png").write_bytes(b"")
    out = tmp_path / "run"
    proc = run_cli(["+mode=predict", f"ckpt={ckpt}", f"predict.inputs=[{bad}]", f"hydra.run.dir={out}"], timeout=120)
    assert proc.returncode != 0
    assert "None of the 2 input file(s) could be decoded" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("warning: skipped") == 2
    assert not (out / "predictions.jsonl").exists() and not list(out.glob("*.tmp"))
