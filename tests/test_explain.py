"""Explain mode on a tiny generated dataset and a tiny scratch checkpoint built here."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat"]


def make_dataset(root: Path, classes=CLASSES, per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """train/ and val/ folders of small PNGs; each class has its own dominant colour."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += 150
                Image.fromarray(img).save(folder / f"{name}_{i}.png")
    return root


def make_checkpoint(path: Path, data_root: Path, classes=CLASSES, act: str = "relu", base: int = 8,
                    image_size: int = 32, extra_config: dict | None = None) -> Path:
    """A randomly initialised scratch checkpoint in the inat format (seeded, so figures are stable)."""
    from inat.checkpoint import save_checkpoint
    from inat.config import Config
    from inat.models import build_from_config

    cfg = OmegaConf.structured(Config)
    cfg.data.root = str(data_root)
    cfg.data.image_size = image_size
    cfg.act.name = act
    cfg.filters.base = base
    cfg.model.dense_units = 16
    if extra_config:
        cfg = OmegaConf.merge(cfg, extra_config)
    torch.manual_seed(0)
    model = build_from_config(cfg, len(classes))
    # A real run stores the sha1 of every train/val image; explain's leak guard needs them.
    train = sorted(p for p in (Path(data_root) / "train").rglob("*") if p.is_file())
    hashes = [hashlib.sha1(p.read_bytes()).hexdigest() for p in train]
    save_checkpoint({"config": OmegaConf.to_container(cfg, resolve=True), "classes": list(classes),
                     "model": model.state_dict(), "split_sha1": {"train": hashes, "val": []}}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data"))
    ckpt = make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt", root)
    return root, ckpt


def test_explain_writes_every_figure_and_json(tiny, tmp_path):
    from inat.explain import explain_checkpoint

    root, ckpt = tiny
    result = explain_checkpoint(ckpt, tmp_path, n_neurons=4)
    figures = json.loads((tmp_path / "explain.json").read_text())["figures"]
    assert set(figures) == {"grid", "filters", "feature_maps", "guided_backprop", "confusion", "mistakes", "gradcam"}
    for name in figures.values():
        with Image.open(tmp_path / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    assert result["n"] == 12 and 0.0 <= result["test_accuracy"] <= 1.0
    assert len(result["grid"]["images"]) == 9  # 3 classes x 3 per class
    assert [r["true"] for r in result["grid"]["images"]] == [c for c in CLASSES for _ in range(3)]
    assert result["filters"]["count"] == 8 and result["filters"]["grid"] == [3, 3]
    assert len(result["guided_backprop"]["neurons"]) == 4
    cm = np.array(result["confusion"]["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 12 and cm.sum(1).tolist() == [4, 4, 4]
    assert abs(np.trace(cm) / 12 - result["test_accuracy"]) < 1e-9


def test_explain_subset_seed_and_chosen_neurons(tiny, tmp_path):
    from inat.explain import explain_checkpoint

    root, ckpt = tiny
    a = explain_checkpoint(ckpt, tmp_path / "a", what=["grid", "guided_backprop"], seed=3, neurons=[0, 2])
    b = explain_checkpoint(ckpt, tmp_path / "b", what=["grid"], seed=3)
    c = explain_checkpoint(ckpt, tmp_path / "c", what=["grid"], seed=4, pick="confident")
    assert a["grid"]["images"] == b["grid"]["images"]  # seeded choice
    assert set(a["figures"]) == {"grid", "guided_backprop"}
    assert [r["neuron"] for r in a["guided_backprop"]["neurons"]] == [0, 2]
    conf = [r["confidence"] for r in c["grid"]["images"]]
    for k in range(3):  # confident: each class row sorted by confidence
        assert conf[3 * k:3 * k + 3] == sorted(conf[3 * k:3 * k + 3], reverse=True)


def test_pick_mistakes_puts_wrong_predictions_first():
    from inat.explain.grid import pick_examples

    labels = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])
    rows = pick_examples(labels, probs, 3, "mistakes", seed=0)
    assert rows[0][:2] == [1, 2]  # the two wrong ones, most confident first
    assert rows[1][0] == 5 and len(rows[1]) == 2  # class 1 has only two images


def test_confusion_helpers():
    from inat.explain.confusion import confused_pairs, per_class_accuracy, worst_mistakes

    cm = np.array([[5, 3, 0], [1, 4, 0], [0, 0, 0]])
    acc = per_class_accuracy(cm)
    assert acc[0] == pytest.approx(5 / 8) and acc[1] == pytest.approx(0.8) and np.isnan(acc[2])
    pairs = confused_pairs(cm, ["a", "b", "c"])
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [("a", "b", 3), ("b", "a", 1)]
    labels = np.array([0, 1, 1])
    probs = np.array([[0.1, 0.9], [0.6, 0.4], [0.95, 0.05]])
    assert worst_mistakes(labels, probs) == [2, 0, 1]


def test_filter_grid_shapes():
    from inat.explain.filters import filter_images, grid_shape

    assert grid_shape(64) == (8, 8) and grid_shape(32) == (6, 6) and grid_shape(10) == (3, 4) and grid_shape(1) == (1, 1)
    tiles = filter_images(torch.randn(5, 3, 3, 3))
    assert tiles.shape == (5, 3, 3, 3) and tiles.min() >= 0 and tiles.max() <= 1
    assert filter_images(torch.randn(4, 16, 3, 3)).shape == (4, 3, 3, 3)  # non-RGB input drawn grey


def test_test_folder_needs_the_guard(tiny):
    from inat.data.folder import scan_test
    from inat.errors import InatError

    root, _ = tiny
    with pytest.raises(InatError):
        scan_test(root, CLASSES)  # explain reads it only inside test_access("explain")


def test_bad_inputs_are_sentences(tiny, tmp_path):
    from inat.errors import InatError
    from inat.explain import explain_checkpoint

    root, ckpt = tiny
    with pytest.raises(InatError, match="explain.what"):
        explain_checkpoint(ckpt, tmp_path, what=["saliency"])
    with pytest.raises(InatError, match="explain.pick"):
        explain_checkpoint(ckpt, tmp_path, what=["grid"], pick="best")
    with pytest.raises(InatError, match="out of range"):
        explain_checkpoint(ckpt, tmp_path, what=["guided_backprop"], neurons=[99])


def test_cli_explain(tiny, tmp_path):
    """The command as typed in the docs, through Hydra, with an explicit feature-map image."""
    root, ckpt = tiny
    image = next((root / "val" / "bee").iterdir())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run.py", "+mode=explain", f"ckpt={ckpt}", "explain.what=[filters,grid]",
                           f"explain.image={image}", f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "explain.json").read_text())
    assert data["feature_maps"]["image"] == image.name
    assert (out / "grid.png").is_file() and (out / "filters.png").is_file() and (out / "feature_maps.png").is_file()
    bad = subprocess.run([sys.executable, "run.py", "+mode=explain", f"ckpt={tmp_path / 'missing.pt'}",
                          f"hydra.run.dir={tmp_path / 'bad'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
