"""Where a run's training, validation and test images come from: class folders or a manifest.

The one place that decides between the folder layout (``data.root`` with ``train/`` and
``test/`` or ``val/``, see ``inat.data.folder``) and a manifest (``data.manifest``, and
``data.test_manifest`` for the test set, see ``inat.data.manifest``). Every caller (training,
the split, lr_find, sweeps, test mode, the audit) asks here and gets the same ``FolderSplit``
objects whichever it is. The test set is listed only inside ``test_access``, and test rows that
are training or validation rows (the same path) are refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from inat.data.download import ensure_dataset
from inat.data.folder import (FolderSplit, check_not_train, check_test_access, check_test_folder, find_val_dir, roles,
                              scan_test, scan_train, scan_val)
from inat.data.manifest import Row, as_split, overlapping, read_manifest, split_rows, train_classes
from inat.errors import InatError


def _manifest(data_cfg: Any, key: str = "manifest") -> Optional[Path]:
    value = data_cfg.get(key)  # absent from the config of a checkpoint older than manifests
    return Path(value) if value else None


def _level(data_cfg: Any) -> str:
    return str(data_cfg.get("label_level") or "name")


def dataset_root(data_cfg: Any, fetch: bool = True) -> Path:
    """The folder paths are relative to: the manifest's folder, else ``data.root`` (nature_12K
    downloaded first when ``fetch`` and it is the missing default root)."""
    manifest = _manifest(data_cfg)
    if manifest is not None:
        if not manifest.is_file():
            raise InatError(f"Manifest '{manifest}' does not exist.")
        return manifest.parent
    if fetch:
        return ensure_dataset(data_cfg)
    return Path(data_cfg["root"])


def _rows(data_cfg: Any) -> Dict[str, List[Row]]:
    return split_rows(read_manifest(_manifest(data_cfg), _level(data_cfg)))


def scan_train_set(data_cfg: Any, root: Path) -> FolderSplit:
    """The training images; their classes are the run's classes (sorted names)."""
    manifest = _manifest(data_cfg)
    if manifest is None:
        return scan_train(root)
    train = _rows(data_cfg)["train"]
    return as_split(train, train_classes(train, manifest), root, manifest, "training")


def scan_val_set(data_cfg: Any, root: Path, classes: Sequence[str]) -> Optional[FolderSplit]:
    """The dataset's own validation split (``val/`` beside ``test/``, or a manifest's ``split=val``
    rows), or None: the split is then carved from the training images."""
    manifest = _manifest(data_cfg)
    if manifest is None:
        return scan_val(root, classes) if find_val_dir(root) is not None else None
    val = _rows(data_cfg)["val"]
    return as_split(val, classes, root, manifest, "validation") if val else None


def _test_rows(data_cfg: Any) -> Optional[Tuple[List[Row], Path]]:
    """The test rows and the manifest they come from, or None for a test folder. Lists no image."""
    manifest, test_manifest = _manifest(data_cfg), _manifest(data_cfg, "test_manifest")
    in_manifest = _rows(data_cfg)["test"] if manifest is not None else []
    if test_manifest is not None:
        if in_manifest:
            raise InatError(f"Manifest '{manifest}' has split=test rows and data.test_manifest='{test_manifest}' is "
                            f"set too; keep one test set.")
        return read_manifest(test_manifest, _level(data_cfg), test=True), test_manifest
    if manifest is not None:
        if not in_manifest:
            raise InatError(f"Manifest '{manifest}' has no split=test rows and data.test_manifest is not set, so "
                            f"there is no test set; add one or set train.then_test=false.")
        return in_manifest, manifest
    return None


def _check_rows(rows: List[Row], source: Path, data_cfg: Any, root: Path, classes: Sequence[str]) -> FolderSplit:
    """The test rows as a FolderSplit, refused when one is a training or validation row (by path)."""
    if not rows:
        raise InatError(f"Test manifest '{source}' has no rows.")
    test = as_split(rows, classes, root, source, "test")
    train = scan_train_set(data_cfg, root)
    val = scan_val_set(data_cfg, root, train.classes)
    seen = [Row(p, "", "train") for p in train.paths + (val.paths if val is not None else ())]
    shared = overlapping(rows, seen)
    if shared:
        raise InatError(f"{len(shared)} test row(s) of '{source}' are training or validation images (first: "
                        f"'{shared[0]}'); the test score would be inflated, so the test set is refused.")
    return test


def check_test_set(data_cfg: Any) -> None:
    """Before training: the test set exists, its classes are training classes and it shares no
    path with training. No image is opened; a folder layout whose ``train/`` is not there yet
    (nature_12K before its download) is checked by test mode instead."""
    root = dataset_root(data_cfg, fetch=False)
    test = _test_rows(data_cfg)
    if test is None:
        if (root / "train").is_dir():
            check_test_folder(root, scan_train(root).classes)
        return
    if _manifest(data_cfg) is None and not (root / "train").is_dir():
        return
    _check_rows(*test, data_cfg, root, scan_train_set(data_cfg, root).classes)


def scan_test_set(data_cfg: Any, root: Path, classes: Sequence[str]) -> FolderSplit:
    """The test images labelled with the run's ``classes``; only inside ``test_access``."""
    check_test_access()
    test = _test_rows(data_cfg)
    if test is None:
        check_not_train(root)
        return scan_test(root, classes)
    return _check_rows(*test, data_cfg, root, classes)


def describe_roles(data_cfg: Any, root: Path) -> str:
    """Where train, validation and test come from, for the start line."""
    manifest, test_manifest = _manifest(data_cfg), _manifest(data_cfg, "test_manifest")
    if manifest is None and test_manifest is None:
        return roles(root)
    if manifest is None:  # class folders train, the test manifest replaces the test folder
        train = roles(root).rsplit(", ", 1)[0]
    else:
        rows = _rows(data_cfg)
        train = (f"{manifest}: split=train rows train, split=val rows validate (given)" if rows["val"] else
                 f"{manifest}: its training rows train and validate (stratified split)")
    test = f"{test_manifest} is the test set" if test_manifest else "its split=test rows are the test set"
    return f"{train}, {test}"


def audit_sources(data_cfg: Any) -> Dict[str, Tuple[str, List[Tuple[str, Path]]]]:
    """For the audit of a manifest: ``{split: (the file it comes from, [(class, path), ...])}``.

    Rows are listed as written (a missing file is the audit's to report); only inside
    ``test_access``, since the test rows are listed too.
    """
    check_test_access()
    manifest, test_manifest = _manifest(data_cfg), _manifest(data_cfg, "test_manifest")
    assert manifest is not None, "audit_sources is for data.manifest"
    out = {split: (manifest.name, [(r.label, r.path) for r in rows]) for split, rows in _rows(data_cfg).items() if rows}
    if test_manifest is not None:
        out["test"] = (test_manifest.name, [(r.label, r.path) for r in
                                            read_manifest(test_manifest, _level(data_cfg), test=True)])
    return out


def uses_manifest(data_cfg: Any) -> bool:
    """Whether the training images come from ``data.manifest`` rather than class folders."""
    return _manifest(data_cfg) is not None
