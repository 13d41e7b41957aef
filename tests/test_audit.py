"""The audit on a generated dataset with one of each problem, and on imagewoof10 (slow)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from inat.data.audit import audit_dataset, phash
from inat.errors import InatError

REPO = Path(__file__).resolve().parents[1]
IMAGEWOOF = REPO.parent / "shared/datasets/imagewoof10"


def _blocks(seed: int, size: int = 64, mode: str = "RGB") -> Image.Image:
    """A seeded 8x8 grid of random colour blocks: strong structure, unrelated across seeds."""
    rng = np.random.default_rng(seed)
    shape = (8, 8, 3) if mode == "RGB" else (8, 8)
    small = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    return small.resize((size, size), Image.Resampling.NEAREST)


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit") / "ds"
    ant, bee, val_ant, val_bee = (root / "train/ant", root / "train/bee", root / "val/ant", root / "val/bee")
    for folder in (ant, bee, val_ant, val_bee):
        folder.mkdir(parents=True)
    _blocks(1).save(ant / "a0.png")
    shutil.copy(ant / "a0.png", ant / "a0_copy.png")  # exact duplicate within a class
    _blocks(2, mode="L").save(ant / "gray.jpg", quality=95)
    _blocks(3).convert("CMYK").save(ant / "cmyk.jpg", quality=95)
    _blocks(4, size=16).save(ant / "tiny.png")
    (ant / "broken.jpg").write_bytes(_jpeg(_blocks(5))[:600])  # truncated JPEG
    (ant / "notes.txt").write_text("where these photos came from\n")
    base = _blocks(6, size=96)
    (ant / "near.jpg").write_bytes(_jpeg(base, 95))
    # The same photo, brighter and re-encoded at a lower quality: bytes differ, content does not.
    (ant / "near_bright.jpg").write_bytes(_jpeg(ImageEnhance.Brightness(base).enhance(1.08), 70))
    _blocks(7).save(ant / "shared.png")
    shutil.copy(ant / "shared.png", bee / "shared_copy.png")  # same bytes under two classes
    _blocks(8).save(bee / "b0.png")
    (bee / "fake.jpg").write_bytes(b"not really a jpeg")
    shutil.copy(bee / "b0.png", val_bee / "b0_leak.png")  # a train image in the test folder
    _blocks(9).save(val_ant / "v0.png")
    return audit_dataset(root, workers=2, progress=False)


def _paths(entries):
    return sorted(e if isinstance(e, str) else e["path"] for e in entries)


def test_counts_per_split(report):
    assert report["test_folder"] == "val"
    assert report["classes"] == ["ant", "bee"]
    assert report["splits"]["train"]["counts"] == {"ant": 10, "bee": 3}
    assert report["splits"]["test"]["counts"] == {"ant": 1, "bee": 1}
    assert report["splits"]["train"]["images"] == 10  # 13 files less notes.txt, broken.jpg, fake.jpg


def test_broken_files_are_all_listed(report):
    p = report["problems"]
    assert p["non_image"] == ["train/ant/notes.txt"]
    assert _paths(p["truncated"]) == ["train/ant/broken.jpg"]
    assert "truncated" in p["truncated"][0]["error"].lower()
    assert _paths(p["unreadable"]) == ["train/bee/fake.jpg"]


def test_odd_images(report):
    p = report["problems"]
    assert _paths(p["grayscale"]) == ["train/ant/gray.jpg"]
    assert p["cmyk"] == [{"path": "train/ant/cmyk.jpg", "mode": "CMYK"}]
    assert p["tiny"] == [{"path": "train/ant/tiny.png", "width": 16, "height": 16}]
    assert p["palette"] == [] and p["other_mode"] == []


def test_exact_duplicates_grouped_by_kind(report):
    exact = report["exact_duplicates"]
    assert [g["files"] for g in exact["within_class"]] == [["train/ant/a0.png", "train/ant/a0_copy.png"]]
    assert [g["files"] for g in exact["across_classes"]] == [["train/ant/shared.png", "train/bee/shared_copy.png"]]
    assert [g["files"] for g in exact["across_splits"]] == [["train/bee/b0.png", "val/bee/b0_leak.png"]]
    assert exact["across_splits"][0]["splits"] == ["test", "train"]
    assert exact["across_classes"][0]["classes"] == ["ant", "bee"]


def test_near_duplicates_exclude_exact_copies(report):
    near = report["near_duplicates"]
    assert [g["files"] for g in near["within_class"]] == [["train/ant/near.jpg", "train/ant/near_bright.jpg"]]
    assert near["within_class"][0]["max_distance"] <= report["settings"]["near_distance"]
    assert near["across_classes"] == [] and near["across_splits"] == []


def test_phash_is_stable_under_resize_and_far_between_photos():
    a, b = _blocks(11, size=128), _blocks(12, size=128)
    assert bin(phash(a) ^ phash(a.resize((61, 61), Image.Resampling.BILINEAR))).count("1") <= 4
    assert bin(phash(a) ^ phash(b)).count("1") > 12


def test_missing_root_is_a_sentence(tmp_path):
    with pytest.raises(InatError, match=r"^Dataset root '.*nowhere' does not exist\.$"):
        audit_dataset(tmp_path / "nowhere", progress=False)


def test_audit_mode_via_run_py(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 3), ("val", 1)):
        (root / split / "c").mkdir(parents=True)
        for i in range(n):
            _blocks(20 + i + 10 * (split == "val")).save(root / split / "c" / f"{i}.png")
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "run.py", "+mode=audit", f"data.root={root}", f"hydra.run.dir={out_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out_dir / "audit.json").read_text())["splits"]["train"]["files"] == 3
    assert "Byte-identical duplicates" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not IMAGEWOOF.is_dir(), reason="needs ../shared/datasets/imagewoof10")
def test_imagewoof10_known_cross_class_pair():
    report = audit_dataset(IMAGEWOOF, workers=2, progress=False)
    pair = ["val/australian_terrier/n02096294_1992.jpg", "val/border_terrier/n02093754_4120.jpg"]
    groups = report["exact_duplicates"]["across_classes"]
    assert any(g["files"] == pair and g["splits"] == ["test"] for g in groups)
    assert report["splits"]["train"]["files"] == 9025 and report["splits"]["test"]["files"] == 3927
