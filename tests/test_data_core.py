"""Split, decode-once cache and the test-folder guard."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from inat.data.cache import cache_key, load_or_build
from inat.data.folder import scan_test, scan_train, test_access
from inat.data.split import build_split
from inat.errors import InatError
from conftest import make_dataset


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 33, 7, 120])
    tr, va = build_split(labels, 0.2, seed=3)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
    for c, n in enumerate([50, 33, 7, 120]):
        assert abs((labels[va] == c).sum() - 0.2 * n) <= 1
    tr2, va2 = build_split(labels, 0.2, seed=3)
    assert (va == va2).all()
    assert not (build_split(labels, 0.2, seed=4)[1] == va).all()


def test_test_folder_is_guarded(tiny_data):
    classes = scan_train(tiny_data).classes
    with pytest.raises(InatError, match="only be read by test mode"):
        scan_test(tiny_data, classes)
    with test_access("unit test"):
        assert len(scan_test(tiny_data, classes)) == 12


def test_class_in_test_unknown_to_train_is_an_error(tiny_data):
    (tiny_data / "val" / "stranger").mkdir()
    with test_access("unit test"), pytest.raises(InatError, match="stranger"):
        scan_test(tiny_data, scan_train(tiny_data).classes)


def _build(args):
    paths, size, directory = args
    cache = load_or_build([Path(p) for p in paths], size, directory=directory, workers=1, progress=False)
    return str(cache.path), float(np.asarray(cache.images).mean())


def test_concurrent_builds_share_one_valid_cache(tiny_data, tmp_path):
    paths = [str(p) for p in scan_train(tiny_data).paths]
    with mp.get_context("spawn").Pool(2) as pool:
        (p1, m1), (p2, m2) = pool.map(_build, [(paths, 32, str(tmp_path / "c"))] * 2)
    assert p1 == p2 and m1 == m2
    files = sorted(f.name for f in (tmp_path / "c").iterdir())
    assert not [f for f in files if ".tmp" in f], files  # no temp leftovers
    assert sum(f.endswith(".npy") for f in files) == 1


def test_changed_file_rebuilds_cache(tiny_data, tmp_path):
    folder = scan_train(tiny_data)
    first = load_or_build(folder.paths, 32, directory=str(tmp_path), progress=False)
    again = load_or_build(folder.paths, 32, directory=str(tmp_path), progress=False)
    assert first.path == again.path
    from PIL import Image

    target = folder.paths[0]
    Image.new("RGB", (40, 40), (255, 255, 255)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_or_build(folder.paths, 32, directory=str(tmp_path), progress=False)
    assert changed.path != first.path
    assert np.asarray(changed.images[0]).min() == 255 and np.asarray(first.images[0]).min() < 255
    assert cache_key(folder.paths, 32, "bilinear", 1.0) != cache_key(folder.paths, 48, "bilinear", 1.0)


def test_corrupt_image_fails_with_its_name(tiny_data, tmp_path):
    bad = tiny_data / "train" / "class_0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InatError, match="broken.jpg"):
        load_or_build(scan_train(tiny_data).paths, 32, directory=str(tmp_path), workers=1, progress=False)
    assert not list(tmp_path.glob("*.npy"))
