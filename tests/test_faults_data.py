"""Fault battery, part 3: the dataset on disk, photo orientation, resume and checkpoint writes.

Each case is one the hostile-input battery found going on silently or ending in a
traceback: a class folder that is a symbolic link (the same files under a second label),
phone photos stored sideways with an EXIF orientation tag, ``resume=true`` after train/
changed, a real file-size limit while torch writes a checkpoint, and three messages that
named the wrong problem. Every refusal is one ``error:`` sentence (exit 2 through
``inat._fail``) and leaves the files it found as they were.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, make_dataset
from inat.checkpoint import save_checkpoint
from inat.data.folder import check_test_folder, scan_test, scan_train, test_access
from inat.errors import InatError
from test_engine import compose
from test_explain import make_checkpoint
from test_faults import fails_cleanly
from test_faults_files import _limit_file_size

CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("faults_data") / "data", n_classes=3, n_train=4, n_test=2, size=24)


def copy_data(data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data, root, symlinks=True)
    return root


# --------------------------------------------------------------------------- class folders that are symbolic links

LINKS = {"alias": ("class_1", "class folder 'class_1'"), "loop": (".", "the folder that lists it")}


def _list(root: Path, where: str):
    if where == "train":
        return scan_train(root)
    with test_access("test"):
        return scan_test(root, CLASSES)


@pytest.mark.parametrize("where", ["train", "val"])
@pytest.mark.parametrize("kind", list(LINKS))
def test_class_folder_that_is_a_symlink_is_refused(capsys, data, tmp_path, where, kind):
    target, needle = LINKS[kind]
    root = copy_data(data, tmp_path)
    link = root / where / kind
    link.symlink_to(target, target_is_directory=True)
    fails_cleanly(capsys, lambda: _list(root, where), f"'{link}'", f"symbolic link to '{target}'", needle,
                  "second label")
    if where == "val":  # the check before training lists only folder names, and refuses it too
        fails_cleanly(capsys, lambda: check_test_folder(root, CLASSES + [kind]), f"'{link}'", needle)


def test_symlinked_image_and_a_linked_folder_of_its_own_stay_allowed(data, tmp_path):
    root = copy_data(data, tmp_path)
    outside = tmp_path / "elsewhere"
    (outside / "class_3").mkdir(parents=True)
    Image.new("RGB", (24, 24), (9, 99, 199)).save(outside / "photo.png")
    Image.new("RGB", (24, 24), (199, 9, 99)).save(outside / "class_3" / "x.png")
    (root / "train" / "class_0" / "linked.png").symlink_to(outside / "photo.png")
    (root / "train" / "class_3").symlink_to(outside / "class_3", target_is_directory=True)
    folder = scan_train(root)
    assert folder.classes == ("class_0", "class_1", "class_2", "class_3")
    assert root / "train" / "class_0" / "linked.png" in folder.paths
    assert folder.counts() == [5, 4, 4, 1]


def test_audit_lists_a_linked_class_folder_and_reads_its_files_once(data, tmp_path):
    from inat.data.audit import audit_dataset

    root = copy_data(data, tmp_path)
    (root / "train" / "alias").symlink_to("class_1", target_is_directory=True)
    report = audit_dataset(root, workers=1, progress=False)
    assert [(e["path"], e["target"]) for e in report["problems"]["linked_classes"]] == [("train/alias", "class_1")]
    assert "alias" not in report["classes"]
    assert report["exact_duplicates"]["across_classes"] == []  # not reported again as 4 label conflicts


# --------------------------------------------------------------------------- EXIF orientation

def _upright() -> np.ndarray:
    """(72, 48, 3): a portrait photo, red left half, blue right half, a green band at the top."""
    img = np.zeros((72, 48, 3), dtype=np.uint8)
    img[:, :24] = (230, 30, 30)
    img[:, 24:] = (30, 30, 230)
    img[:24] = (30, 200, 30)
    return img


def _sideways_jpeg(path: Path, orientation: int) -> Path:
    """The upright image stored as a camera does: pixels turned, plus the tag that turns them back."""
    stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    img = Image.fromarray(_upright()).transpose(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, subsampling=0, exif=exif)  # 4:4:4: no chroma blur across the colour edges
    with Image.open(path) as check:
        assert check.size == (72, 48) and check.getexif()[0x0112] == orientation  # stored sideways
    return path


def _decoded(path: Path, route: str, size: int, tmp_path: Path) -> np.ndarray:
    """``path`` decoded at ``size`` through one of the paths that feed a model."""
    spec = SimpleNamespace(input_size=size, interpolation="bilinear", crop_pct=1.0)
    if route == "decode_image":
        from inat.data.images import decode_image
        return decode_image(path, size)
    if route == "cache":  # train/ and the test folder: decoded once into the memory map
        from inat.data.cache import load_or_build
        return np.asarray(load_or_build([path], size, directory=str(tmp_path / "cache"), workers=1,
                                        progress=False).images[0])
    if route == "predict":
        from inat.predict import iter_decoded
        (_, batch, bad), = list(iter_decoded([path], spec, batch_size=4, workers=1))
        assert bad == []
        return batch[0]
    if route == "explain":
        from inat.explain.scoring import decode_many
        return decode_many([path], spec, workers=1)[0]
    from inat.inference import Preprocess  # detect: the frame, then the classifier's crop of it
    from inat.detect.app import read_image
    return Preprocess(size).array(read_image(path)[:, :, ::-1])


@pytest.mark.parametrize("route", ["decode_image", "cache", "predict", "explain", "detect"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied_on_every_decode_path(tmp_path, orientation, route):
    from inat.data.images import decode_image

    photo = _sideways_jpeg(tmp_path / f"phone_{orientation}.jpg", orientation)
    Image.fromarray(_upright()).save(tmp_path / "upright.png")
    expected = decode_image(tmp_path / "upright.png", 16).astype(int)
    got = _decoded(photo, route, 16, tmp_path).astype(int)
    assert got.shape == (16, 16, 3)
    assert np.abs(got - expected).mean() < 8, f"{route}: decoded turned, not upright"


def test_detect_reads_the_whole_frame_upright(tmp_path):
    from inat.detect.app import read_image

    frame = read_image(_sideways_jpeg(tmp_path / "p.jpg", 6))  # BGR, full size
    assert frame.shape == (72, 48, 3)
    assert np.abs(frame[:, :, ::-1].astype(int) - _upright()).mean() < 8


# --------------------------------------------------------------------------- resume after train/ changed

def _fit(root: Path, run_dir: Path, *extra: str):
    from inat.training import fit

    return fit(compose([f"data.root={root}", *FAST, "train.epochs=1", "train.then_test=false",
                        f"data.cache_dir={run_dir.parent / 'cache'}", *extra]), run_dir)


def _snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_after_train_folder_changed_is_refused_and_the_run_folder_kept(capsys, tmp_path):
    root = make_dataset(tmp_path / "data", n_train=6, n_test=1, size=24)
    run_dir = tmp_path / "run"
    _fit(root, run_dir)
    before = _snapshot(run_dir)
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "split.json"} <= set(before)
    for i in range(2):  # two new photos of class_0, one of class_1 deleted
        Image.new("RGB", (24, 24), (200, 10 * i, 30)).save(root / "train" / "class_0" / f"new_{i}.png")
    sorted((root / "train" / "class_1").iterdir())[0].unlink()
    fails_cleanly(capsys, lambda: _fit(root, run_dir, "resume=true"), "resume=true", "changed since",
                  "2 added", "1 removed", "another train/validation split")
    assert _snapshot(run_dir) == before  # checkpoints, split.json and summary.json as they were


def test_split_changes_counts_added_removed_and_moved():
    from inat.data.split import split_changes

    saved = {"train": ["a", "b", "c"], "val": ["d"]}
    assert split_changes(saved, ["a", "b", "c"], ["d"]) == {"added": 0, "removed": 0, "moved": 0}
    assert split_changes(saved, ["a", "b", "d"], ["c"]) == {"added": 0, "removed": 0, "moved": 2}
    assert split_changes(saved, ["a", "e", "c"], ["d", "f"]) == {"added": 2, "removed": 1, "moved": 0}


def test_resume_with_best_but_no_last_says_what_happened(capsys, data, tmp_path):
    """A kill between the first epoch's two writes leaves best.pt alone (best.pt is written first)."""
    run_dir = tmp_path / "run"
    save_checkpoint({"config": {}, "classes": CLASSES, "model": {}}, run_dir / "checkpoints" / "best.pt")
    fails_cleanly(capsys, lambda: _fit(data, run_dir, "resume=true"), f"run folder '{run_dir}'",
                  "no checkpoints/last.pt", "stopped while writing its first checkpoints", "nothing to resume",
                  "without resume=true", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt"]


# --------------------------------------------------------------------------- a checkpoint write past a real size limit

def test_file_size_limit_during_a_checkpoint_write_is_one_sentence(capsys, tmp_path):
    """torch.save meets EFBIG from the kernel and raises RuntimeError; it reads like any OSError."""
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"config": {}, "classes": ["a"], "model": {}}, path)
    before = path.read_bytes()
    big = {"config": {}, "classes": ["a"], "model": {"w": torch.zeros(64_000)}}  # ~256 KB, past the limit
    restore = _limit_file_size(64 * 1024)
    try:
        fails_cleanly(capsys, lambda: save_checkpoint(big, path), f"Could not write '{path}'", "File too large")
    finally:
        restore()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_other_runtime_errors_inside_an_atomic_write_are_not_disguised(tmp_path):
    from inat.runs import atomic_path

    with pytest.raises(RuntimeError, match="a bug"):
        with atomic_path(tmp_path / "x.pt") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("a bug, not the disk")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- messages that named the wrong problem

@pytest.mark.parametrize("reader", ["scan_train", "audit"])
def test_data_root_that_is_a_file(capsys, tmp_path, reader):
    from inat.data.audit import audit_dataset

    root = tmp_path / "data.zip"
    root.write_bytes(b"PK\x03\x04")
    read = scan_train if reader == "scan_train" else lambda r: audit_dataset(r, workers=1, progress=False)
    fails_cleanly(capsys, lambda: read(root), f"'{root}'", "is a file, not a folder", "data.root")


def test_explain_image_that_is_a_folder(capsys, data, tmp_path):
    from inat.explain import explain_checkpoint

    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", data, classes=CLASSES)
    folder = data / "val" / "class_0"
    out = tmp_path / "out"
    fails_cleanly(capsys, lambda: explain_checkpoint(ckpt, out, what=["filters"], image=str(folder)),
                  f"explain.image '{folder}' is a folder", "one image file")
    assert not out.exists() or not any(out.iterdir()), "a figure was drawn before the refusal"


def test_explain_image_missing_still_says_so(capsys, data, tmp_path):
    from inat.explain import explain_checkpoint

    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", data, classes=CLASSES)
    fails_cleanly(capsys, lambda: explain_checkpoint(ckpt, tmp_path / "out", what=["filters"],
                                                     image=str(tmp_path / "nope.jpg")), "does not exist")
    with pytest.raises(InatError):  # a typo is refused whatever else explain.what asks for
        explain_checkpoint(ckpt, tmp_path / "out2", what=["grid"], image=str(tmp_path / "nope.jpg"))
