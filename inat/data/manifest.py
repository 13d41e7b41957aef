"""Read a dataset from a manifest: a CSV of ``path,label[,split]`` or iNaturalist's COCO-style JSON.

Either file lists images with their class; paths are relative to the file's own folder. The
result is the same :class:`FolderSplit` a ``train/<class>/*`` folder gives, so the stratified
split, the decode cache, the leak guard and the audit read a manifest the way they read
folders. Test rows (``split=test`` rows, or every row of ``data.test_manifest``) become a
``FolderSplit`` only inside ``test_access`` (see ``inat.data.folder``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from inat.choices import MANIFEST_SPLITS
from inat.data.folder import IMAGE_EXTENSIONS, FolderSplit
from inat.errors import InatError

SHOW_PATHS = 3  # missing paths named in the error; the count says how many more
KEEP_PARSED = 4  # manifests kept parsed (a train and a test file, two label levels)
JSON_KEYS = {"images": ("id", "file_name"), "annotations": ("image_id", "category_id"), "categories": ("id",)}


_PARSED: Dict[Tuple[str, str, str, bool], Tuple["Row", ...]] = {}


@dataclass(frozen=True)
class Row:
    """One image of a manifest: its path (joined to the manifest's folder), class name and split."""

    path: Path
    label: str
    split: str


def _open(path: Path) -> str:
    if not path.is_file():
        raise InatError(f"Manifest '{path}' does not exist." if not path.exists() else
                        f"Manifest '{path}' is not a file.")
    return path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV often starts with a byte-order mark


def _join(folder: Path, name: str) -> Path:
    """``name`` (relative to the manifest's folder, or absolute) as one normalised path."""
    return Path(os.path.normpath(folder / name))


def read_csv(path: Path, text: str, allowed: Sequence[str] = MANIFEST_SPLITS) -> List[Row]:
    """The rows of ``path``'s ``path,label[,split]`` CSV ``text``; without a split column every row trains."""
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    for needed in ("path", "label"):
        if needed not in columns:
            raise InatError(f"Manifest '{path}' has no column '{needed}' (columns found: "
                            f"{', '.join(columns) or 'none, the file is empty'}); the first line must name "
                            f"path,label and optionally split.")
    rows = []
    for number, record in enumerate(reader, start=1):
        file, label = (record.get("path") or "").strip(), (record.get("label") or "").strip()
        split = (record.get("split") or "").strip() if "split" in columns else allowed[0]
        where = f"Row {number} (line {reader.line_num}) of manifest '{path}'"
        if not file:
            raise InatError(f"{where} has an empty path.")
        if not label:
            raise InatError(f"{where} has an empty label.")
        if split not in allowed:
            raise InatError(f"{where} has split '{split}'; the allowed values are {', '.join(allowed)}.")
        rows.append(Row(_join(path.parent, file), label, split))
    return rows


def _records(data: Dict[str, Any], key: str, path: Path) -> List[Dict[str, Any]]:
    """``data[key]``, a list of objects each holding ``JSON_KEYS[key]``, or one sentence saying what lacks."""
    if not isinstance(data, dict) or key not in data:
        raise InatError(f"Manifest '{path}' has no key '{key}' (an iNaturalist JSON has images, annotations "
                        f"and categories).")
    records = data[key]
    if not isinstance(records, list):
        raise InatError(f"Manifest '{path}': '{key}' is not a list.")
    for i, record in enumerate(records):
        missing = [k for k in JSON_KEYS[key] if not isinstance(record, dict) or k not in record]
        if missing:
            raise InatError(f"Manifest '{path}': entry {i} of '{key}' has no key '{missing[0]}'.")
    return records


def category_names(categories: List[Dict[str, Any]], level: str, path: Path) -> Dict[Any, str]:
    """``{category id: its name at taxonomy level``level``}``; a level some category lacks is refused."""
    levels = sorted(set.intersection(*(set(c) for c in categories)) - {"id"}) if categories else []
    if level not in levels:
        raise InatError(f"Manifest '{path}' has no label level '{level}' in every category; set data.label_level "
                        f"to one of the levels it has: {', '.join(levels) or 'none'}.")
    names = {}
    for c in categories:
        name = str(c[level]).strip() if c[level] is not None else ""
        if not name:
            raise InatError(f"Manifest '{path}': category {c['id']} has an empty label at level '{level}'.")
        names[c["id"]] = name
    return names


def read_inat_json(path: Path, text: str, level: str = "name", split: str = MANIFEST_SPLITS[0]) -> List[Row]:
    """The images of ``path``'s iNaturalist (COCO-style) JSON ``text``, each labelled by its category's ``level``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InatError(f"Manifest '{path}' is not valid JSON ({err.msg} at line {err.lineno}).") from None
    images = _records(data, "images", path)
    annotations = _records(data, "annotations", path)
    names = category_names(_records(data, "categories", path), level, path)
    files = {image["id"]: str(image["file_name"]) for image in images}
    labels: Dict[Any, str] = {}
    for a in annotations:
        if a["image_id"] not in files:
            raise InatError(f"Manifest '{path}': an annotation points at image id {a['image_id']}, which 'images' "
                            f"does not have.")
        if a["category_id"] not in names:
            raise InatError(f"Manifest '{path}': an annotation of image id {a['image_id']} points at category id "
                            f"{a['category_id']}, which 'categories' does not have.")
        if labels.setdefault(a["image_id"], names[a["category_id"]]) != names[a["category_id"]]:
            raise InatError(f"Manifest '{path}': image id {a['image_id']} has annotations of two classes; an image "
                            f"takes one label.")
    bare = [i for i in files if i not in labels]
    if bare:
        raise InatError(f"Manifest '{path}': {len(bare)} image(s) have no annotation (first: id {bare[0]}, "
                        f"'{files[bare[0]]}'), so they have no label.")
    return [Row(_join(path.parent, files[i]), labels[i], split) for i in files]


def read_manifest(path: str | Path, level: str = "name", *, test: bool = False) -> List[Row]:
    """The rows of a ``.csv`` or ``.json`` manifest; with ``test`` (``data.test_manifest``) every row is a test row."""
    path = Path(path)
    allowed = ("test",) if test else MANIFEST_SPLITS
    if path.suffix.lower() not in (".csv", ".json"):
        raise InatError(f"Manifest '{path}' is neither a .csv nor a .json file.")
    if path.suffix.lower() == ".csv" and level != "name" and not test:  # a test CSV names the level's classes
        raise InatError(f"data.label_level={level} chooses a taxonomy level of an iNaturalist JSON; the CSV "
                        f"manifest '{path}' names each class in its label column, so leave data.label_level unset.")
    text = _open(path)
    # One run reads its manifest several times (check, train, val, test): an iNaturalist JSON of
    # millions of images is parsed once per content, not once per reader.
    key = (str(path), hashlib.sha1(text.encode()).hexdigest(), level, test)
    if key not in _PARSED:
        rows = read_csv(path, text, allowed) if path.suffix.lower() == ".csv" else read_inat_json(path, text, level,
                                                                                                  allowed[0])
        while len(_PARSED) >= KEEP_PARSED:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = tuple(rows)
    return list(_PARSED[key])


def check_files(rows: Sequence[Row], path: Path) -> None:
    """Refuse rows whose file does not exist or is not an image (the count and the first few)."""
    missing = [r.path for r in rows if not r.path.is_file()]
    if missing:
        first = ", ".join(f"'{os.path.relpath(p, path.parent)}'" for p in missing[:SHOW_PATHS])
        raise InatError(f"{len(missing)} path(s) in manifest '{path}' do not exist (first: {first}).")
    bad = [r.path for r in rows if r.path.suffix.lower() not in IMAGE_EXTENSIONS]
    if bad:
        raise InatError(f"'{bad[0]}' in manifest '{path}' is not an image file ({len(bad)} such path(s)).")


def as_split(rows: Sequence[Row], classes: Sequence[str], root: Path, path: Path, role: str) -> FolderSplit:
    """``rows`` as a FolderSplit over ``classes``, sorted by class then path like a folder scan.

    Sorting makes the split independent of the order the manifest lists its rows in.
    """
    unknown = sorted({r.label for r in rows} - set(classes))
    if unknown:
        raise InatError(f"Manifest '{path}' has {role} label(s) {', '.join(unknown)} that no training row has "
                        f"(train classes: {', '.join(classes)}).")
    check_files(rows, path)
    index = {c: i for i, c in enumerate(classes)}
    pairs = sorted({(index[r.label], r.path) for r in rows})
    return FolderSplit(root, tuple(classes), tuple(p for _, p in pairs), tuple(label for label, _ in pairs))


def overlapping(test: Sequence[Row], train: Sequence[Row]) -> List[Path]:
    """Test paths that are also training or validation rows (the same file, however it is spelled)."""
    seen = {os.path.realpath(r.path) for r in train}
    return [r.path for r in test if os.path.realpath(r.path) in seen]


def split_rows(rows: Sequence[Row]) -> Dict[str, List[Row]]:
    """``{"train": [...], "val": [...], "test": [...]}`` in the manifest's order."""
    out: Dict[str, List[Row]] = {split: [] for split in MANIFEST_SPLITS}
    for r in rows:
        out[r.split].append(r)
    return out


def train_classes(rows: Sequence[Row], path: Path) -> Tuple[str, ...]:
    """The sorted class names of the training rows; a manifest without one is refused."""
    classes = tuple(sorted({r.label for r in rows}))
    if not classes:
        raise InatError(f"Manifest '{path}' has no training rows.")
    return classes
