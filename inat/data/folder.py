"""Scan a dataset root: ``train/<class>/*`` plus a test folder named ``test/`` or ``val/``.

Classes always come from ``train/``. The test folder is guarded: only code running inside
``test_access()`` (test mode, and explain/report when asked) may list it, so a sweep or a
training run cannot read the test set even by mistake.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

from inat.errors import InatError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

_TEST_ACCESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("inat_test_access", default=None)


@dataclass(frozen=True)
class FolderSplit:
    """One folder of class subfolders: ``paths[i]`` has label ``labels[i]`` in ``classes``."""

    root: Path
    classes: Tuple[str, ...]
    paths: Tuple[Path, ...]
    labels: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> List[int]:
        """Number of images per class, in class order."""
        out = [0] * len(self.classes)
        for label in self.labels:
            out[label] += 1
        return out


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


def _relation(target: Path, where: Path) -> str | None:
    """How resolved folder ``target`` meets resolved folder ``where``: "is", "holds", "lies inside" or None."""
    if target == where:
        return "is"
    if where.is_relative_to(target):
        return "holds"
    return "lies inside" if target.is_relative_to(where) else None


def _overlap(name: str, real: Dict[str, Path], home: Path) -> str | None:
    """What resolved class folder ``real[name]`` overlaps ("is class folder 'daisy'"), or None: its files are its own."""
    rel = _relation(real[name], home)
    if rel in ("is", "holds"):
        return f"{rel} '{home}', the folder that lists it"
    for other, where in real.items():
        rel = _relation(real[name], where) if other != name else None
        if rel:
            return f"{rel} class folder '{other}'"
    return None


def class_dirs(folder: Path) -> List[Path]:
    """Every non-hidden folder in ``folder`` (links to folders included), sorted by name; nothing is checked."""
    return sorted((p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def linked_class_folders(folder: Path) -> List[Tuple[Path, str, str]]:
    """``(link, its target as written, what it overlaps)`` for every class folder of ``folder``
    that is a symbolic link onto ``folder`` itself or above it (``loop -> .``), or onto, into or
    above another class folder (``alias -> daisy``): its files would get a second label.

    A link to a folder of its own elsewhere (a dataset assembled from links) is not listed.
    """
    dirs = class_dirs(folder)
    real = {p.name: p.resolve() for p in dirs}
    home = Path(folder).resolve()
    found = []
    for link in (p for p in dirs if p.is_symlink()):
        overlap = _overlap(link.name, real, home)
        if overlap:
            found.append((link, os.readlink(link), overlap))
    return found


def list_class_folders(folder: Path) -> List[str]:
    """Names of the class folders in ``folder`` (hidden ones skipped), sorted; a linked one
    (``linked_class_folders``) is refused naming the link and where it points."""
    linked = linked_class_folders(folder)
    if linked:
        link, target, overlap = linked[0]
        raise InatError(f"Class folder '{link}' is a symbolic link to '{target}', which {overlap}, so the same "
                        f"images would get a second label; remove the link or make it a folder of its own images.")
    return [p.name for p in class_dirs(folder)]


def check_root(root: Path) -> Path:
    """``root`` as a Path, refused when it is missing or a file (data.root must be a dataset folder)."""
    root = Path(root)
    if root.is_file():
        raise InatError(f"Dataset root '{root}' is a file, not a folder; set data.root to the folder that holds "
                        f"train/ and test/ (or val/).")
    if not root.is_dir():
        raise InatError(f"Dataset root '{root}' does not exist.")
    if not (root / "train").is_dir():
        raise InatError(f"Dataset root '{root}' has no 'train' folder.")
    return root


def scan_folder(folder: Path, classes: Sequence[str] | None = None, *, allow_empty_class: bool = False) -> FolderSplit:
    """List ``folder/<class>/**`` files (hidden files skipped), sorted, with labels.

    When ``classes`` is given (a test folder), a class folder not in it is an error, and
    classes missing from the folder are allowed (they simply have no test images).
    Files with a non-image extension are an error naming the first one: a silently skipped
    file would change the dataset without anyone noticing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InatError(f"Folder '{folder}' does not exist.")
    found = list_class_folders(folder)
    if not found:
        raise InatError(f"Folder '{folder}' has no class subfolders (expected {folder}/<class>/<image>).")
    if classes is None:
        classes = tuple(found)
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise InatError(
                f"Test folder '{folder}' has class folder(s) {', '.join(unknown)} that train/ does not have "
                f"(train classes: {', '.join(classes)})."
            )
    paths: List[Path] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        entries = list(class_dir.rglob("*"))
        broken = sorted(p for p in entries if p.is_symlink() and not p.exists() and not p.name.startswith("."))
        if broken:  # skipping them would silently change the dataset
            raise InatError(f"'{broken[0]}' is a broken symbolic link ({len(broken)} in {folder}); "
                            f"remove it or point it at an image.")
        files = sorted(p for p in entries if _is_candidate(p))
        bad = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if bad:
            raise InatError(
                f"'{bad[0]}' is not an image file ({len(bad)} such file(s) in {folder}); "
                f"remove them or run +mode=audit to list them all."
            )
        if not files and not allow_empty_class:
            raise InatError(f"Class folder '{class_dir}' is empty.")
        paths += files
        labels += [label] * len(files)
    return FolderSplit(folder, tuple(classes), tuple(paths), tuple(labels))


def find_test_dir(root: Path) -> Path:
    """The test folder of a dataset root: ``test/`` if present, else ``val/``."""
    root = Path(root)
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    raise InatError(f"Dataset root '{root}' has no test folder (expected '{root}/test' or '{root}/val').")


def find_val_dir(root: Path) -> Path | None:
    """The given validation folder: ``val/`` when the root also has ``test/``, else None.

    With ``train/``, ``val/`` and ``test/`` the dataset brings its own validation split, and
    nothing is carved from ``train/``. With ``train/`` and ``val/`` only (nature_12K's layout)
    ``val/`` is the TEST set, as it always was.
    """
    root = Path(root)
    return root / "val" if (root / "val").is_dir() and (root / "test").is_dir() else None


def roles(root: Path) -> str:
    """Which folder plays which part, for the start line."""
    root = Path(root)
    if find_val_dir(root) is not None:
        return "train/ trains, val/ validates (given), test/ is the test set"
    test = next((name for name in ("test", "val") if (root / name).is_dir()), None)
    return f"train/ trains and validates (stratified split), {test + '/ is the test set' if test else 'no test folder'}"


def scan_val(root: Path, train_classes: Sequence[str]) -> FolderSplit:
    """The given ``val/`` folder, labelled with train/'s classes (one it lacks is refused)."""
    val_dir = find_val_dir(root)
    assert val_dir is not None, root
    unknown = [c for c in list_class_folders(val_dir) if c not in train_classes]
    if unknown:
        raise InatError(f"Validation folder '{val_dir}' has class folder(s) {', '.join(unknown)} that train/ does not "
                        f"have (train classes: {', '.join(train_classes)}).")
    val = scan_folder(val_dir, train_classes, allow_empty_class=True)
    if not len(val):
        raise InatError(f"Validation folder '{val_dir}' has no images (expected {val_dir}/<class>/<image>); remove it "
                        f"to carve the validation split from train/.")
    return val


def scan_train(root: Path) -> FolderSplit:
    """The ``train/`` folder of a dataset root; its class folders define the classes."""
    return scan_folder(check_root(root) / "train")


def check_test_folder(root: Path, train_classes: Sequence[str]) -> Path:
    """Before training: the test folder exists and its class folders are all train classes.

    Only folder names are listed (no image is opened, so nothing of the test set reaches
    training); a missing test folder or an unknown test class is refused now instead of after
    the whole training. Returns the test folder.
    """
    test_dir = find_test_dir(root)
    found = list_class_folders(test_dir)
    if not found:
        raise InatError(f"Test folder '{test_dir}' has no class subfolders (expected {test_dir}/<class>/<image>).")
    unknown = [c for c in found if c not in train_classes]
    if unknown:
        raise InatError(f"Test folder '{test_dir}' has class folder(s) {', '.join(unknown)} that train/ does not have "
                        f"(train classes: {', '.join(train_classes)}).")
    return test_dir


@contextlib.contextmanager
def test_access(purpose: str) -> Iterator[None]:
    """Allow reading the test folder inside this block (``purpose`` names who asks)."""
    token = _TEST_ACCESS.set(purpose)
    try:
        yield
    finally:
        _TEST_ACCESS.reset(token)


def check_test_access() -> None:
    """Refuse unless inside ``test_access``: the test set is read by test mode (and explain/report) only."""
    if _TEST_ACCESS.get() is None:
        raise InatError(
            "The test set may only be read by test mode (+mode=test) or by explain/report on request; "
            "training, validation and sweeps use the training images only."
        )


def check_not_train(root: Path) -> Path:
    """The test folder of ``root``, refused when it is ``train/`` itself (e.g. ``val -> train`` symlink)."""
    test_dir = find_test_dir(root)
    train_dir = Path(root) / "train"
    if train_dir.exists() and os.path.samefile(test_dir, train_dir):
        raise InatError(f"The test folder '{test_dir}' is the training folder '{train_dir}' (a symbolic link?); "
                        f"a score on it would measure training images, so it was not computed.")
    return test_dir


def scan_test(root: Path, classes: Sequence[str]) -> FolderSplit:
    """The test folder, only inside ``test_access``: everything else is refused."""
    check_test_access()
    return scan_folder(find_test_dir(root), classes, allow_empty_class=True)


test_access.__test__ = False  # not a pytest test, despite its name
