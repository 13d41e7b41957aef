"""Fault battery, part 2: data files, checkpoints, the filesystem, the run lock, downloads (issue 14).

Each case checks the issue's promise in-process: one ``error:`` sentence naming the file
(exit 2 through ``inat._fail``), no traceback, no half-written or temp file left behind,
nothing executed from a checkpoint. Faults a root user cannot cause for real (a read-only
folder, a full disk) are injected as the OSError the kernel would raise; a file-size limit
(RLIMIT_FSIZE) gives a real kernel write failure. Downloads run against a loopback server.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import inat.runs
from conftest import make_dataset
from inat.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from inat.data.cache import load_or_build
from inat.data.folder import check_test_folder, scan_train
from inat.data.split import build_split
from inat.errors import InatError
from inat.runs import acquire_run_lock, atomic_open, write_json
from test_download import _dataset_zip, _sha, server  # noqa: F401 - server is the loopback fixture
from test_explain import make_checkpoint
from test_faults import fails_cleanly

CLASSES = ["class_0", "class_1", "class_2"]


def leftovers(folder: Path) -> list:
    """Temp and partial files a failed write could leave behind."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.name.endswith((".tmp", ".part", ".tmp.npy"))
                  or ".tmp" in p.name or p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("faults") / "data", n_classes=3, n_train=4, n_test=2, size=24)


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt", data, classes=CLASSES)


def copy_data(data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data, root)
    return root


# --------------------------------------------------------------------------- checkpoints (causes 2, 11, 15)

class _RunsCode:
    """A pickle payload whose ``__reduce__`` would run a shell command on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tampered(kind: str, good: dict, path: Path, marker: Path) -> None:
    """Write a checkpoint damaged in one way (``kind``) to ``path``."""
    state = {k: v for k, v in good.items()}
    if kind == "code_in_pickle":
        torch.save({"format": FORMAT, "config": good["config"], "classes": good["classes"], "model": good["model"],
                    "payload": _RunsCode(marker)}, path)
    elif kind == "code_before_marker":
        with open(path, "wb") as fh:
            pickle.dump(_RunsCode(marker), fh)
    elif kind == "object_in_pickle":
        torch.save({"format": FORMAT, **{k: v for k, v in good.items() if k != "format"}, "ns": SimpleNamespace(a=1)}, path)
    elif kind == "marker_only":
        torch.save({"format": FORMAT}, path)
    elif kind in ("no_weights", "no_config", "no_classes"):
        state.pop({"no_weights": "model", "no_config": "config", "no_classes": "classes"}[kind])
        torch.save(state, path)
    elif kind == "short_class_list":
        state["classes"] = good["classes"][:2]
        torch.save(state, path)
    elif kind == "empty_class_list":
        state["classes"] = []
        torch.save(state, path)
    elif kind == "classes_not_names":
        state["classes"] = [0, 1, 2]
        torch.save(state, path)
    elif kind == "weights_not_tensors":
        state["model"] = {k: 1.0 for k in good["model"]}
        torch.save(state, path)
    elif kind == "weights_wrong_shape":
        state["model"] = {k: v[..., :1] if v.ndim else v for k, v in good["model"].items()}
        torch.save(state, path)
    elif kind == "config_without_model":
        state["config"] = {"data": good["config"]["data"]}
        torch.save(state, path)
    elif kind == "wrong_marker":
        state["format"] = "inat-checkpoint-v0"
        torch.save(state, path)
    elif kind == "not_a_dict":
        torch.save([good["model"]], path)
    elif kind == "plain_state_dict":
        torch.save(good["model"], path)
    elif kind == "truncated":
        full = io.BytesIO()
        torch.save(good, full)
        path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "text_file":
        path.write_text("this is not a checkpoint\n")
    else:
        raise AssertionError(kind)


TAMPERED = {
    "code_in_pickle": "was refused", "code_before_marker": "was refused", "object_in_pickle": "was refused",
    "marker_only": "is incomplete", "no_weights": "'model' field", "no_config": "'config' field",
    "no_classes": "'classes' field", "short_class_list": "with 2 classes", "empty_class_list": "no valid class list",
    "classes_not_names": "no valid class list", "weights_not_tensors": "not tensors",
    "weights_wrong_shape": "weights do not fit", "config_without_model": "no 'model' section",
    "wrong_marker": "is not an inat checkpoint", "not_a_dict": "is not an inat checkpoint",
    "plain_state_dict": "is not an inat checkpoint", "truncated": "could not be read", "empty_file": "could not be read",
    "text_file": "could not be read",
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hand-pickled payload, refused anyway
@pytest.mark.parametrize("kind", list(TAMPERED))
def test_tampered_checkpoint_is_one_sentence_and_runs_nothing(capsys, ckpt, tmp_path, kind):
    from inat.models import model_from_checkpoint

    good = torch.load(ckpt, weights_only=True)
    bad, marker = tmp_path / "bad.pt", tmp_path / "pwned"
    _tampered(kind, good, bad, marker)
    fails_cleanly(capsys, lambda: model_from_checkpoint(bad), str(bad), TAMPERED[kind])
    assert not marker.exists(), "code in the checkpoint ran"


CONSUMERS = ["test", "predict", "export", "explain", "detect_classify", "report"]


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_no_mode_executes_code_from_a_checkpoint(capsys, data, tmp_path, consumer):
    good = torch.load(make_checkpoint(tmp_path / "good.pt", data, classes=CLASSES), weights_only=True)
    bad, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _tampered("code_in_pickle", good, bad, marker)
    out = tmp_path / "out"
    if consumer == "test":
        from inat.holdout import test_checkpoint
        run = lambda: test_checkpoint(bad, out, progress=False)  # noqa: E731
    elif consumer == "predict":
        from inat.predict import predict_images
        run = lambda: predict_images(bad, [data / "train"], out)  # noqa: E731
    elif consumer == "export":
        from inat.export import export_checkpoint
        run = lambda: export_checkpoint(bad, out)  # noqa: E731
    elif consumer == "explain":
        from inat.explain import explain_checkpoint
        run = lambda: explain_checkpoint(bad, out)  # noqa: E731
    elif consumer == "detect_classify":
        from inat.detect.app import SpeciesNamer
        run = lambda: SpeciesNamer(str(bad))  # noqa: E731
    else:
        from inat.report import _explain_best
        run = lambda: _explain_best(SimpleNamespace(explain_dir=None, best_ckpt=bad, name="r"), out, True)  # noqa: E731
    fails_cleanly(capsys, run, "was refused")
    assert not marker.exists()
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("target,needle", [("dir", "is a directory"), ("missing", "does not exist"),
                                           ("empty", "needs a checkpoint")])
def test_ckpt_that_is_a_folder_missing_or_unset(capsys, tmp_path, target, needle):
    path = {"dir": tmp_path, "missing": tmp_path / "nope.pt", "empty": ""}[target]
    fails_cleanly(capsys, lambda: load_checkpoint(path), needle)


def test_own_checkpoint_with_numpy_scalars_still_loads(tmp_path, ckpt):
    """weights_only keeps what inat writes loadable: metrics may be numpy scalars."""
    state = torch.load(ckpt, weights_only=True)
    state["state"] = {"best_val_accuracy": np.float64(0.5), "epoch": np.int64(3)}
    torch.save(state, tmp_path / "np.pt")
    assert load_checkpoint(tmp_path / "np.pt")["state"]["best_val_accuracy"] == 0.5


# --------------------------------------------------------------------------- the leak guard (cause 1)

def _symlinked_val(data: Path, tmp_path: Path) -> Path:
    root = copy_data(data, tmp_path)
    shutil.rmtree(root / "val")
    (root / "val").symlink_to(root / "train", target_is_directory=True)
    return root


def _copied_train_image(data: Path, tmp_path: Path) -> Path:
    root = copy_data(data, tmp_path)
    src = sorted((root / "train" / "class_1").iterdir())[0]
    shutil.copy(src, root / "val" / "class_1" / "leaked.png")
    return root


LEAKS = {"val_symlink_to_train": (_symlinked_val, "is the training folder"),
         "train_image_copied_into_val": (_copied_train_image, "byte-identical")}


@pytest.mark.parametrize("path", ["test", "explain", "report"])
@pytest.mark.parametrize("leak", list(LEAKS))
def test_every_path_that_scores_the_test_folder_checks_for_leaks(capsys, data, tmp_path, path, leak):
    make_root, needle = LEAKS[leak]
    root = make_root(data, tmp_path)
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", root, classes=CLASSES)
    out = tmp_path / "out"
    if path == "test":
        from inat.holdout import test_checkpoint
        run = lambda: test_checkpoint(ckpt, out, progress=False)  # noqa: E731
    elif path == "explain":
        from inat.explain import explain_checkpoint
        run = lambda: explain_checkpoint(ckpt, out, what=["grid", "confusion"])  # noqa: E731
    else:
        from inat.report import _explain_best
        run = lambda: _explain_best(SimpleNamespace(explain_dir=None, best_ckpt=ckpt, name="r"), out, True)  # noqa: E731
    fails_cleanly(capsys, run, needle)
    assert not list(out.rglob("*.json")) and not list(out.rglob("*.png")), "a score was published"


def test_checkpoint_without_split_hashes_is_not_scored(capsys, data, tmp_path):
    from inat.explain.scoring import score_test_set
    from inat.models import model_from_state

    state = torch.load(make_checkpoint(tmp_path / "c.pt", data, classes=CLASSES), weights_only=True)
    state.pop("split_sha1")
    model = model_from_state(state)
    fails_cleanly(capsys, lambda: score_test_set(model, model.spec, state, data), "no split hashes")


# --------------------------------------------------------------------------- checks before training (cause 14)

def test_test_folder_checks_run_without_reading_images(capsys, data, tmp_path):
    root = copy_data(data, tmp_path)
    assert check_test_folder(root, CLASSES) == root / "val"
    (root / "val" / "class_9").mkdir()
    fails_cleanly(capsys, lambda: check_test_folder(root, CLASSES), "class_9", "train classes: class_0")
    shutil.rmtree(root / "val")
    fails_cleanly(capsys, lambda: check_test_folder(root, CLASSES), "has no test folder", f"{root}/val")
    (root / "test").mkdir()
    fails_cleanly(capsys, lambda: check_test_folder(root, CLASSES), "no class subfolders")


# --------------------------------------------------------------------------- degenerate splits (cause 16)

@pytest.mark.parametrize("labels,fraction,needle", [
    ([0] * 10, 0.2, "single class ('class_0')"), ([1] * 3, 0.5, "single class ('class_1')"),
    ([0] * 5 + [1], 0.6, "Class 'class_1' has a single image"), ([0] * 5 + [1] * 5 + [2], 0.7, "'class_2'"),
    ([0, 1], 0.0, "data.val_fraction must be between 0 and 1"), ([0, 1], 1.0, "data.val_fraction"),
])
def test_degenerate_split_is_refused(capsys, labels, fraction, needle):
    fails_cleanly(capsys, lambda: build_split(labels, fraction, 0, classes=CLASSES), needle)


def test_single_image_class_stays_in_training_at_low_fraction():
    train, val = build_split([0] * 5 + [1], 0.2, 0)
    assert 5 in train and 5 not in val


# --------------------------------------------------------------------------- image files (causes 5, 9; BytesIO, symlinks)

def _png16(path: Path, value: int) -> Path:
    Image.fromarray(np.full((20, 20), value, dtype=np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # a real 16-bit PNG
    return path


@pytest.mark.parametrize("value", [0, 1000, 32896, 65535])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, value):
    from inat.data.images import decode_image

    img = decode_image(_png16(tmp_path / "deep.png", value), 16)
    assert img.shape == (16, 16, 3)
    assert int(img.max()) == int(img.min()) == round(value / 257)


def test_16_bit_png_through_the_decode_cache(tmp_path):
    paths = [_png16(tmp_path / f"{v}.png", v) for v in (0, 25700, 65535)]
    cache = load_or_build(paths, 8, directory=str(tmp_path / "cache"), workers=1, progress=False)
    assert [int(cache.images[i].mean()) for i in range(3)] == [0, 100, 255]


BAD_FILES = {
    "zero_bytes.png": b"", "text.jpg": b"hello, not a jpeg", "truncated.png": None, "garbage.webp": b"\x00" * 64,
    "header_only.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF",
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_undecodable_training_image_names_the_file_not_a_bytesio(capsys, data, tmp_path, name):
    root = copy_data(data, tmp_path)
    target = root / "train" / "class_2" / name
    if BAD_FILES[name] is None:
        good = sorted((root / "train" / "class_2").glob("*.png"))[0].read_bytes()
        target.write_bytes(good[: len(good) // 2])
    else:
        target.write_bytes(BAD_FILES[name])
    cache_dir = tmp_path / "cache"
    line = fails_cleanly(capsys, lambda: load_or_build(scan_train(root).paths, 16, directory=str(cache_dir), workers=1,
                                                       progress=False), str(target))
    assert "BytesIO" not in line and "0x" not in line
    assert not leftovers(cache_dir) and not list(cache_dir.glob("*.npy"))


def test_unreadable_training_image_is_named(capsys, data, tmp_path, monkeypatch):
    root = copy_data(data, tmp_path)
    locked = sorted((root / "train" / "class_0").glob("*.png"))[1]
    real = Path.read_bytes

    def read_bytes(self):
        if self == locked:  # root ignores chmod 000: raise what the kernel would for another user
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    fails_cleanly(capsys, lambda: load_or_build(scan_train(root).paths, 16, directory=str(tmp_path / "c"), workers=1,
                                                progress=False), str(locked), "Permission denied")
    assert not leftovers(tmp_path / "c")


@pytest.mark.parametrize("where", ["train", "val"])
def test_broken_symlink_is_reported_not_skipped(capsys, data, tmp_path, where):
    from inat.data.folder import scan_test, test_access

    root = copy_data(data, tmp_path)
    link = root / where / "class_1" / "gone.png"
    link.symlink_to(tmp_path / "missing.png")
    if where == "train":
        run = lambda: scan_train(root)  # noqa: E731
    else:
        def run():
            with test_access("test"):
                return scan_test(root, CLASSES)
    fails_cleanly(capsys, run, str(link), "broken symbolic link")


def test_audit_lists_broken_symlinks_and_16_bit_files(data, tmp_path):
    from inat.data.audit import audit_dataset

    root = copy_data(data, tmp_path)
    (root / "train" / "class_1" / "gone.png").symlink_to(tmp_path / "missing.png")
    report = audit_dataset(root, workers=1, progress=False)
    bad = {f["path"]: f for f in report["files"] if f["status"] != "ok"} if "files" in report else report
    assert "train/class_1/gone.png" in str(bad)
    assert "broken symbolic link" in str(bad)


@pytest.mark.parametrize("case", ["non_image_extension", "empty_class", "no_class_folders", "no_train", "no_root"])
def test_dataset_layout_faults(capsys, data, tmp_path, case):
    root = copy_data(data, tmp_path)
    needle = {"non_image_extension": "is not an image file", "empty_class": "is empty",
              "no_class_folders": "has no class subfolders", "no_train": "has no 'train' folder",
              "no_root": "does not exist"}[case]
    if case == "non_image_extension":
        (root / "train" / "class_0" / "notes.txt").write_text("x")
    elif case == "empty_class":
        (root / "train" / "class_9").mkdir()
    elif case == "no_class_folders":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif case == "no_train":
        shutil.rmtree(root / "train")
    else:
        root = tmp_path / "nowhere"
    fails_cleanly(capsys, lambda: scan_train(root), needle)


# --------------------------------------------------------------------------- the decode cache (causes 9, 10)

def test_cache_dir_that_is_a_file(capsys, data, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    fails_cleanly(capsys, lambda: load_or_build(scan_train(data).paths, 16, directory=str(blocker), progress=False),
                  str(blocker), "is a file", "data.cache_dir")


def test_cache_dir_below_a_file(capsys, data, tmp_path):
    (tmp_path / "f").write_text("a file")
    fails_cleanly(capsys, lambda: load_or_build(scan_train(data).paths, 16, directory=str(tmp_path / "f" / "c"),
                                                progress=False), "data.cache_dir")


def test_read_only_cache_dir(capsys, data, tmp_path, monkeypatch):
    target = tmp_path / "ro"
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == target:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    fails_cleanly(capsys, lambda: load_or_build(scan_train(data).paths, 16, directory=str(target), progress=False),
                  str(target), "Read-only file system", "writable")


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes have really been written."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _fill_disk_after(monkeypatch, room: int) -> None:
    """Writes through ``inat.runs.atomic_open`` hit a full disk after ``room`` bytes."""
    monkeypatch.setattr(inat.runs, "open", lambda *a, **k: _FullDisk(open(*a, **k), room), raising=False)


@pytest.mark.parametrize("room", [0, 100, 2000])
def test_full_disk_during_the_cache_build(capsys, data, tmp_path, monkeypatch, room):
    _fill_disk_after(monkeypatch, room)
    cache_dir = tmp_path / "cache"
    fails_cleanly(capsys, lambda: load_or_build(scan_train(data).paths, 16, directory=str(cache_dir), workers=1,
                                                progress=False), "No space left on device", "free some space")
    assert not leftovers(cache_dir) and not list(cache_dir.glob("*.npy")) and not list(cache_dir.glob("*.json"))


def _limit_file_size(limit: int):
    """A real kernel write failure (EFBIG) past ``limit`` bytes; returns the restore function."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def restore() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    return restore


def test_file_size_limit_during_the_cache_build_is_caught_not_sigbus(capsys, data, tmp_path):
    paths = scan_train(data).paths  # listed before the limit: pytest and PIL need no writes after it
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    restore = _limit_file_size(4096)
    try:
        fails_cleanly(capsys, lambda: load_or_build(paths, 32, directory=str(cache_dir), workers=1, progress=False),
                      "Could not write", ".npy")
    finally:
        restore()
    assert not leftovers(cache_dir) and not list(cache_dir.glob("*.npy"))


# --------------------------------------------------------------------------- atomic writes (cause 9)

def test_full_disk_during_a_checkpoint_write_keeps_the_old_one(capsys, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "best.pt"
    save_checkpoint({"config": {}, "classes": ["a"], "model": {}}, path)
    before = path.read_bytes()

    def torch_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", torch_save)
    fails_cleanly(capsys, lambda: save_checkpoint({"config": {}, "classes": ["a"], "model": {}}, path),
                  str(path), "No space left on device")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]


@pytest.mark.parametrize("room", [0, 10, 200])
def test_full_disk_during_a_json_write(capsys, tmp_path, monkeypatch, room):
    _fill_disk_after(monkeypatch, room)
    fails_cleanly(capsys, lambda: write_json(tmp_path / "summary.json", {"x": list(range(200))}),
                  "summary.json", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_during_a_json_write(capsys, tmp_path):
    restore = _limit_file_size(1024)
    try:
        fails_cleanly(capsys, lambda: write_json(tmp_path / "big.json", {"x": list(range(5000))}), "big.json")
    finally:
        restore()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["target_is_dir", "parent_is_file", "read_only", "permission"])
def test_write_errors_are_one_sentence(capsys, tmp_path, monkeypatch, case):
    target = tmp_path / "out" / "test.json"
    needle = {"target_is_dir": "is a directory", "parent_is_file": "test.json", "read_only": "Read-only",
              "permission": "Permission denied"}[case]
    if case == "target_is_dir":
        target.mkdir(parents=True)
    elif case == "parent_is_file":
        (tmp_path / "out").write_text("file")
    else:
        err = (errno.EROFS, "Read-only file system") if case == "read_only" else (errno.EACCES, "Permission denied")

        def refuse(*args, **kwargs):
            raise OSError(*err)
        monkeypatch.setattr(inat.runs, "open", refuse, raising=False)
    fails_cleanly(capsys, lambda: write_json(target, {"a": 1}), needle)
    assert not leftovers(tmp_path)


def test_interrupt_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "metrics.csv") as fh:
            fh.write("epoch,loss\n")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["predict", "export"])
def test_output_folder_that_cannot_be_written(capsys, data, ckpt, tmp_path, mode):
    (tmp_path / "file").write_text("in the way")
    out = tmp_path / "file" / "out"
    if mode == "predict":
        from inat.predict import predict_images
        run = lambda: predict_images(ckpt, [data / "val"], out, workers=1)  # noqa: E731
    else:
        from inat.export import export_checkpoint
        run = lambda: export_checkpoint(ckpt, out, fmt="torchscript", verify_images=2)  # noqa: E731
    fails_cleanly(capsys, run, str(out), "Could not write")
    assert not leftovers(tmp_path)


def test_report_out_that_is_a_directory(capsys, tmp_path):
    from inat.report import build_report

    fails_cleanly(capsys, lambda: build_report([str(tmp_path)], tmp_path, tmp_path / "work"),
                  "report.out", "is a directory", "report.html")


# --------------------------------------------------------------------------- the run-folder lock (cause 4, signals)

def test_second_writer_of_a_run_folder_is_refused(capsys, tmp_path):
    with acquire_run_lock(tmp_path / "run") as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(InatError):
            with acquire_run_lock(tmp_path / "run"):
                pass
    # inside: the refusal sentence names the pid and the way out
    with acquire_run_lock(tmp_path / "run"):
        fails_cleanly(capsys, lambda: acquire_run_lock(tmp_path / "run").__enter__(), str(os.getpid()),
                      "hydra.run.dir")
    assert not (tmp_path / "run" / ".inat.lock").exists()


def _holder(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from inat.runs import acquire_run_lock\n"
            f"with acquire_run_lock({str(run_dir)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_live_process_refuses_and_a_killed_one_frees_the_folder(capsys, tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        fails_cleanly(capsys, lambda: acquire_run_lock(run_dir).__enter__(), f"pid {proc.pid}", "in use")
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup code runs in the holder
        proc.wait()
    with acquire_run_lock(run_dir):  # resume after kill -9 takes the folder back
        assert (run_dir / ".inat.lock").read_text().strip() == str(os.getpid())


def test_lock_in_a_folder_that_cannot_exist(capsys, tmp_path):
    (tmp_path / "f").write_text("file")
    fails_cleanly(capsys, lambda: acquire_run_lock(tmp_path / "f" / "run").__enter__(), "Could not lock")


# --------------------------------------------------------------------------- download (cause 12, sha256)

@pytest.mark.parametrize("sha", ["xyz", "a" * 63, "a" * 65, "z" * 64, "sha256:" + "a" * 64])
def test_malformed_sha256_is_refused_before_any_request(capsys, server, tmp_path, sha):
    from inat.data.download import prepare_dataset

    server.files["/d.zip"] = _dataset_zip()
    fails_cleanly(capsys, lambda: prepare_dataset(tmp_path / "d", server.url("/d.zip"), sha, progress=False),
                  "data.sha256 must be 64 hexadecimal", sha)
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def _zip(members: list) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members:
            if body is None:
                zf.writestr(zipfile.ZipInfo(name), b"")  # a name ending in '/' is a folder entry
            else:
                zf.writestr(name, body)
    return buf.getvalue()


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("top/train/a/link.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _bad_crc_zip() -> bytes:
    data = bytearray(_zip([("top/train/a/0.png", b"x" * 500), ("top/val/a/0.png", b"y" * 500)]))
    i = data.find(b"x" * 500)
    data[i + 10] ^= 0xFF
    return bytes(data)


ARCHIVES = {
    "member_through_a_file": (lambda: _zip([("top/train", b"file"), ("top/train/a/0.png", b"png")]),
                              "lies inside 'top/train', which is a file"),
    "file_then_folder_entry": (lambda: _zip([("top/x", b"file"), ("top/x/", None)]), "both a file and a folder"),
    "dotdot": (lambda: _zip([("top/../../evil.txt", b"x")]), "'..' component"),
    "absolute": (lambda: _zip([("/tmp/evil.txt", b"x")]), "an absolute path"),
    "symlink": (_symlink_zip, "a symbolic link"),
    "bad_crc": (_bad_crc_zip, "is corrupted"),
    "not_a_zip": (lambda: b"this is not a zip file at all" * 10, "is corrupted"),
    "no_dataset_inside": (lambda: _zip([("top/readme.txt", b"hello")]), "has no folder with 'train'"),
}


@pytest.mark.parametrize("kind", list(ARCHIVES))
def test_bad_archive_from_the_server_is_one_sentence_and_leaves_no_staging(capsys, server, tmp_path, kind):
    from inat.data.download import prepare_dataset

    make, needle = ARCHIVES[kind]
    body = make()
    server.files["/d.zip"] = body
    root = tmp_path / "data" / "d"
    fails_cleanly(capsys, lambda: prepare_dataset(root, server.url("/d.zip"), _sha(body), progress=False), needle)
    assert not root.exists()
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name != "d.zip"] == []  # no staging, no .part
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("case", ["wrong_sha256", "http_404", "server_down"])
def test_bad_transfer_is_one_sentence_and_keeps_no_partial_file(capsys, server, tmp_path, case):
    from inat.data.download import download_file

    body = _dataset_zip()
    server.files["/d.zip"] = body
    sha, url = _sha(body), server.url("/d.zip")
    needle = {"wrong_sha256": "has sha256", "http_404": "HTTP 404", "server_down": "failed after 0 retries"}[case]
    if case == "wrong_sha256":
        sha = hashlib.sha256(b"other").hexdigest()
    elif case == "http_404":
        url = server.url("/missing.zip")
    else:
        with socket.socket() as sock:  # a loopback port nobody listens on
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/d.zip"
    fails_cleanly(capsys, lambda: download_file(url, tmp_path / "d.zip", sha256=sha, progress=False, retries=0,
                                                backoff=0.0), needle)
    assert not (tmp_path / "d.zip").exists() and not (tmp_path / "d.zip.part").exists()


# --------------------------------------------------------------------------- checkpoint order, detect, interrupts (causes 3, signals)

def test_best_is_saved_before_last_so_a_kill_between_keeps_the_best(tmp_path, monkeypatch):
    from inat.checkpoint import save_epoch_checkpoints

    written = []
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "last.pt":  # a kill -9 right here: last.pt is never written
            raise KeyboardInterrupt
        written.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_epoch_checkpoints({"config": {}, "classes": ["a"], "model": {}}, tmp_path, improved=True)
    assert written == ["best.pt"] and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_detect_skips_an_unreadable_image_like_predict(tmp_path, capsys):
    from inat.detect.app import iter_frames

    good, bad = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(good)
    bad.write_bytes(b"not an image")
    skipped: list = []
    frames = list(iter_frames("images", tmp_path, [bad, good], skipped))
    assert [f.source for f in frames] == [str(good)] and [s for s, _ in skipped] == [str(bad)]
    assert f"warning: skipped '{bad}'" in capsys.readouterr().err


def _interrupted(cfg, out_dir):
    raise KeyboardInterrupt


def test_ctrl_c_is_one_sentence(capsys, monkeypatch, tmp_path):
    import inat
    from inat.config import Config

    monkeypatch.setitem(inat.MODES, "train", "test_faults_files:_interrupted")
    monkeypatch.setattr(inat, "output_dir", lambda: tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        inat.run(OmegaConf.structured(Config))
    assert exc.value.code == 2
    from test_faults import assert_one_error
    assert_one_error(capsys.readouterr().err, "Interrupted.")


@pytest.mark.parametrize("case", ["no_test_folder", "unknown_test_class"])
def test_train_mode_checks_the_test_folder_before_training(capsys, data, tmp_path, monkeypatch, case):
    """The train command (``inat.modes.train``) refuses before ``fit`` is called (fit is replaced by a tripwire here)."""
    import inat.training
    from inat.config import Config
    from inat.modes.train import run as train_mode

    root = copy_data(data, tmp_path)
    if case == "no_test_folder":
        shutil.rmtree(root / "val")
    else:
        (root / "val" / "class_7").mkdir()
    monkeypatch.setattr(inat.training, "fit", lambda *a, **k: pytest.fail("training started"))
    cfg = OmegaConf.structured(Config)
    cfg.data.root = str(root)
    fails_cleanly(capsys, lambda: train_mode(cfg, tmp_path / "run"), "no test folder" if case == "no_test_folder"
                  else "class_7")
    assert not (tmp_path / "run").exists()


def test_no_network_says_where_to_put_the_archive_and_a_placed_one_is_used(capsys, tmp_path, monkeypatch):
    """Offline, the download failure names the archive path; an archive put there is extracted with no request."""
    import inat.data.download as download

    with socket.socket() as sock:  # a loopback port nobody listens on: the request fails at once
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/nature_12K.zip"
    root = tmp_path / "data" / "nature_12K"
    root.parent.mkdir()
    original = download.download_file
    monkeypatch.setattr(download, "download_file", lambda *a, **k: original(*a, **{**k, "retries": 0, "backoff": 0.0}))
    fails_cleanly(capsys, lambda: download.prepare_dataset(root, url, progress=False),
                  f"put it at '{tmp_path / 'data' / 'nature_12K.zip'}'")
    assert not root.exists()
    (tmp_path / "data" / "nature_12K.zip").write_bytes(_dataset_zip())  # fetched "on another machine"
    assert download.prepare_dataset(root, url, progress=False) == root and (root / "train").is_dir()
