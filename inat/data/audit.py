"""Audit a dataset root: counts, broken files, odd images, duplicates and train/test leakage.

Training stops at the first bad file; the audit lists them all. Every file under ``train/``
and the test folder is read once in a worker process: its sha256 (byte-identical copies), a
strict PIL decode (unreadable and truncated files; colour mode and size) and a 64-bit
perceptual hash (pHash, DCT) of the decoded image (near-duplicates: re-encoded, resized or
brightened copies). Duplicate groups are sorted by how much they hurt: a copy shared by
train/ and the test folder leaks test images into training, a copy under two classes is a
label conflict, a copy within one class only weighs that photo twice.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from inat.data.dataset import audit_sources, dataset_root, uses_manifest
from inat.data.folder import (IMAGE_EXTENSIONS, check_root, class_dirs, find_test_dir, find_val_dir,
                              linked_class_folders, test_access)
from inat.errors import InatError

# Shorter side below this many pixels: upsampled to the training size it is mostly blur.
MIN_SIDE = 32
# Perceptual-hash bits that may differ for two images to count as near-duplicates; 4 of 64 catches
# re-encodes and small brightness changes while staying far from unrelated photos (~32).
NEAR_DISTANCE = 4
# An RGB image whose channels differ by at most this many levels (on the decoded thumbnail)
# is a gray photo stored as colour: it carries no colour cue, whatever its mode says.
GRAY_TOLERANCE = 2
SHOW_ITEMS = 10  # items per list in the printed summary; audit.json has them all

GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
NORMAL_MODES = {"RGB", "RGBA", "RGBX"}
DUPLICATE_KINDS = ("within_class", "across_classes", "across_splits")


# --------------------------------------------------------------------------- per file (workers)


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Refuse truncated images while inside, whatever another part of the process set."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _worker_init() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


@functools.lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> Any:
    """Orthonormal DCT-II matrix ``(n, n)``: ``C @ x @ C.T`` is the 2-D DCT of ``x``."""
    k = np.arange(n)
    matrix = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def phash(image: Any) -> int:
    """64-bit perceptual hash of a PIL image: signs of its lowest 8x8 DCT frequencies vs their median.

    The image is reduced to a 32x32 gray thumbnail; the 8x8 lowest frequencies describe its
    coarse layout, which survives resizing, re-encoding, brightness and contrast changes
    and small crops. On imagewoof10 it found every true copy a 64-bit difference hash found,
    without the difference hash's false matches between flat, centred photos.
    """
    thumb = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)  # (32, 32)
    dct = _dct_matrix(32)
    low = (dct @ thumb @ dct.T)[:8, :8]  # (8, 8)
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def inspect_file(path: str) -> Dict[str, Any]:
    """Check one file: sha256, strict decode (status, error), format, mode, size and perceptual hash.

    ``status`` is ``ok``, ``non_image`` (extension not an image one: training refuses it),
    ``unreadable`` (PIL cannot identify or decode it) or ``truncated``; ``gray`` is true for
    a 1-channel mode or colour channels within ``GRAY_TOLERANCE``. JPEGs are decoded in
    draft mode (DCT scaling to about 64 px): the whole entropy-coded stream is still read,
    so truncation is still caught, at a fraction of a full decode's cost.
    """
    out: Dict[str, Any] = {"status": "ok", "error": None, "format": None, "mode": None,
                           "width": None, "height": None, "phash": None, "gray": False}
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:  # permission denied, a broken symlink, an I/O error: listed, not fatal
        reason = "a broken symbolic link" if os.path.islink(path) and not os.path.exists(path) else err.strerror
        out.update(status="unreadable", error=f"cannot be read: {reason or err}", bytes=0, sha256=None)
        return out
    out["bytes"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        out["status"] = "non_image"
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF chatter
            image = Image.open(io.BytesIO(data))
            out["format"], out["mode"] = image.format, image.mode
            out["width"], out["height"] = image.size
            image.draft("RGB", (64, 64))  # no-op for formats other than JPEG
            image.load()
            # Upright as training decodes it, so a sideways-stored photo hashes like its upright copy.
            ImageOps.exif_transpose(image, in_place=True)
            out["phash"] = phash(image)
            if image.mode in GRAYSCALE_MODES:
                out["gray"] = True
            else:
                rgb = np.asarray(image.convert("RGB"), dtype=np.int16)  # (H, W, 3)
                spread = np.abs(rgb[..., :2] - rgb[..., 1:]).max() if rgb.size else 0
                out["gray"] = bool(spread <= GRAY_TOLERANCE)
    except UnidentifiedImageError:
        out["status"], out["error"] = "unreadable", "not a recognisable image"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad data
        message = str(err) or type(err).__name__
        out["status"] = "truncated" if "truncated" in message.lower() else "unreadable"
        out["error"] = message
    return out


# --------------------------------------------------------------------------- listing


class Listing(NamedTuple):
    """One split folder as the audit lists it."""

    files: List[Tuple[str, Path]]  # (class, file) under folder/<class>/**, hidden skipped
    classes: List[str]
    stray: List[Path]  # files directly in the split folder, outside any class
    linked: List[Tuple[Path, str, str]]  # (link, target, overlap): see folder.linked_class_folders


def _list_split(folder: Path) -> Listing:
    """List one split folder: its class folders' files, classes, stray files and linked class folders.

    A class folder that is a symbolic link onto another class folder or onto ``folder``
    itself is listed as a problem (training refuses it) and its files are not read again.
    """
    linked = linked_class_folders(folder)
    skip = {link.name for link, _, _ in linked}
    classes = [p.name for p in class_dirs(folder) if p.name not in skip]
    stray = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files: List[Tuple[str, Path]] = []
    for name in classes:
        for path in sorted((folder / name).rglob("*")):
            # A broken symlink is listed too: the inspection reports it instead of skipping it silently.
            if (path.is_file() or path.is_symlink() and not path.exists()) and \
                    not any(part.startswith(".") for part in path.relative_to(folder).parts):
                files.append((name, path))
    return Listing(files, classes, stray, linked)


# --------------------------------------------------------------------------- grouping


def find_near_pairs(hashes: Sequence[int], max_distance: int = NEAR_DISTANCE) -> List[Tuple[int, int, int]]:
    """All ``(i, j, distance)`` with Hamming distance <= ``max_distance`` between 64-bit hashes.

    Multi-index hashing: split the 64 bits into ``max_distance + 1`` bands; by pigeonhole two
    hashes that close agree exactly on at least one band, so only hashes sharing a band value
    are compared (vectorised per bucket), not all n^2 pairs.
    """
    if not 0 <= max_distance < 64:
        raise InatError(f"Near-duplicate distance must be between 0 and 63 bits, got {max_distance}.")
    values = np.asarray(list(hashes), dtype=np.uint64)
    n = len(values)
    bands = max_distance + 1
    widths = [64 // bands + (1 if i < 64 % bands else 0) for i in range(bands)]
    found: Dict[Tuple[int, int], int] = {}
    shift = 0
    for width in widths:
        keys = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
        starts, ends = np.r_[0, cuts], np.r_[cuts, n]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = order[start:end]
            i, j = np.triu_indices(len(members), 1)
            a, b = members[i], members[j]
            dist = np.bitwise_count(values[a] ^ values[b])
            keep = dist <= max_distance
            for x, y, d in zip(a[keep].tolist(), b[keep].tolist(), dist[keep].tolist()):
                found[(min(x, y), max(x, y))] = int(d)
    return sorted((i, j, d) for (i, j), d in found.items())


def _components(n: int, edges: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Connected components (union-find) with more than one member, members sorted."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: Dict[int, List[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), []).append(x)
    return [g for g in groups.values() if len(g) > 1]


def _describe_group(files: List[Dict[str, Any]], **extra: Any) -> Tuple[str, Dict[str, Any]]:
    """Which kind of duplicate a set of files is, and its JSON record."""
    splits = sorted({f["split"] for f in files})
    classes = sorted({f["class"] for f in files})
    kind = "across_splits" if len(splits) > 1 else "across_classes" if len(classes) > 1 else "within_class"
    record = {"files": sorted(f["path"] for f in files), "splits": splits, "classes": classes, **extra}
    return kind, record


def _group_duplicates(files: List[Dict[str, Any]], max_distance: int) -> Tuple[Dict[str, list], Dict[str, list]]:
    """Byte-identical groups (same sha256) and near-duplicate groups (perceptual hashes close, bytes differ)."""
    images = [f for f in files if f["status"] == "ok"]
    by_sha: Dict[str, List[Dict[str, Any]]] = {}
    for f in images:
        by_sha.setdefault(f["sha256"], []).append(f)
    exact: Dict[str, list] = {k: [] for k in DUPLICATE_KINDS}
    for sha, group in by_sha.items():
        if len(group) > 1:
            kind, record = _describe_group(group, sha256=sha)
            exact[kind].append(record)
    # One representative per content: identical copies are already reported above, and
    # their identical hashes would only inflate the buckets.
    contents = list(by_sha)
    pairs = find_near_pairs([by_sha[sha][0]["phash"] for sha in contents], max_distance)
    components = _components(len(contents), [(i, j) for i, j, _ in pairs])
    component_of = {m: c for c, members in enumerate(components) for m in members}
    worst = [0] * len(components)
    for i, _, d in pairs:
        worst[component_of[i]] = max(worst[component_of[i]], d)
    near: Dict[str, list] = {k: [] for k in DUPLICATE_KINDS}
    for c, members in enumerate(components):
        group = [f for m in members for f in by_sha[contents[m]]]
        kind, record = _describe_group(group, max_distance=worst[c])
        near[kind].append(record)
    for table in (exact, near):
        for kind in DUPLICATE_KINDS:
            table[kind].sort(key=lambda r: r["files"])
    return exact, near


# --------------------------------------------------------------------------- the audit


def _inspect_all(paths: List[str], workers: int, progress: bool) -> List[Dict[str, Any]]:
    bar = dict(total=len(paths), desc="audit", unit="file", disable=not progress, mininterval=0.5)
    if workers <= 1 or len(paths) < 2:
        with _strict_pil():
            return [inspect_file(p) for p in tqdm(paths, **bar)]
    # fork (Linux default) starts workers in milliseconds; chunks amortise the IPC cost.
    with multiprocessing.Pool(workers, initializer=_worker_init) as pool:
        return list(tqdm(pool.imap(inspect_file, paths, chunksize=64), **bar))


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (``../`` where a manifest points outside its folder), with slashes."""
    return Path(os.path.relpath(path, root)).as_posix()


def _list_folders(root: Path) -> Tuple[Path, Dict[str, str], Dict[str, Listing]]:
    """The class-folder layout: ``(root, {split: folder name}, {split: listing})``, the test folder
    listed under ``test_access("audit")``."""
    root = check_root(root)
    split_dirs: Dict[str, Path] = {"train": root / "train"}
    if find_val_dir(root) is not None:  # train/ + val/ + test/: val/ is the given validation split
        split_dirs["val"] = find_val_dir(root)
    with test_access("audit"):
        try:
            split_dirs["test"] = find_test_dir(root)
        except InatError:
            pass  # a root without a test folder can still be audited; the report says so
        listings = {split: _list_split(folder) for split, folder in split_dirs.items()}
    return root, {split: folder.name for split, folder in split_dirs.items()}, listings


def audit_dataset(
    root: Path,
    *,
    workers: int = 2,
    near_distance: int = NEAR_DISTANCE,
    min_side: int = MIN_SIDE,
    progress: bool = True,
    data_cfg: Any = None,
) -> Dict[str, Any]:
    """Audit every file of ``root``'s ``train/`` and test folder (or every row of ``data_cfg``'s
    manifests, when it names one); return the report as a dict.

    The report (what ``audit.json`` holds) has per-split class counts, the lists of
    non-image, unreadable and truncated files, grayscale/CMYK/palette/other-mode and tiny
    (shorter side < ``min_side``) images, class folders that are links onto another, and byte-identical and near-duplicate (perceptual hash within
    ``near_distance`` bits) groups, each split into ``within_class``, ``across_classes`` and
    ``across_splits`` (train/test leakage). Paths are relative to ``root``. Nothing stops it
    early: every problem is listed. The test folder is listed under ``test_access("audit")``.
    """
    started = time.perf_counter()
    if data_cfg is not None and uses_manifest(data_cfg):
        root = dataset_root(data_cfg, fetch=False)
        with test_access("audit"):
            sources = audit_sources(data_cfg)
        names = {split: name for split, (name, _) in sources.items()}
        listings = {split: Listing(rows, sorted({c for c, _ in rows}), [], []) for split, (_, rows) in sources.items()}
    else:
        root, names, listings = _list_folders(root)

    files: List[Dict[str, Any]] = []
    for split, listing in listings.items():
        for class_name, path in listing.files:
            files.append({"path": _relative(path, root), "split": split, "class": class_name, "abs": str(path)})
    results = _inspect_all([f["abs"] for f in files], workers, progress)
    for f, result in zip(files, results):
        del f["abs"]
        f.update(result)

    train_classes = listings["train"].classes
    classes = sorted(set(train_classes).union(*(listing.classes for listing in listings.values())))
    splits: Dict[str, Any] = {}
    for split, listing in listings.items():
        counts = {c: 0 for c in listing.classes}
        for class_name, _ in listing.files:
            counts[class_name] += 1
        in_split = [f for f in files if f["split"] == split]
        splits[split] = {
            "folder": names[split],
            "files": len(in_split),
            "images": sum(f["status"] == "ok" for f in in_split),
            "counts": counts,
        }

    def entry(f: Dict[str, Any], *keys: str) -> Dict[str, Any]:
        return {"path": f["path"], **{k: f[k] for k in keys}}

    ok = [f for f in files if f["status"] == "ok"]
    problems = {
        "non_image": [f["path"] for f in files if f["status"] == "non_image"],
        "unreadable": [entry(f, "error") for f in files if f["status"] == "unreadable"],
        "truncated": [entry(f, "error") for f in files if f["status"] == "truncated"],
        "grayscale": [entry(f, "mode") for f in ok if f["gray"]],
        "cmyk": [entry(f, "mode") for f in ok if f["mode"] == "CMYK"],
        "palette": [entry(f, "mode") for f in ok if f["mode"] in ("P", "PA")],
        "other_mode": [entry(f, "mode") for f in ok
                       if f["mode"] not in GRAYSCALE_MODES | NORMAL_MODES | {"CMYK", "P", "PA"}],
        "tiny": [entry(f, "width", "height") for f in ok if min(f["width"], f["height"]) < min_side],
        "stray_files": [_relative(p, root) for listing in listings.values() for p in listing.stray],
        "linked_classes": [{"path": _relative(link, root), "target": target, "overlap": overlap}
                           for listing in listings.values() for link, target, overlap in listing.linked],
        "empty_classes": [f"{names[s]}/{c}" for s, data in splits.items() for c, n in data["counts"].items() if n == 0],
        "test_only_classes": [c for c in (listings["test"].classes if "test" in listings else [])
                              if c not in train_classes],
    }
    exact, near = _group_duplicates(files, near_distance)
    return {
        "root": str(root),
        "test_folder": names.get("test"),
        "classes": classes,
        "splits": splits,
        "problems": problems,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "settings": {"min_side": min_side, "near_distance": near_distance, "hash": "phash-64", "workers": workers},
        "seconds": round(time.perf_counter() - started, 2),
    }


# --------------------------------------------------------------------------- the summary


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def _show(lines: List[str], items: Sequence[str]) -> None:
    for item in items[:SHOW_ITEMS]:
        lines.append(f"    {item}")
    if len(items) > SHOW_ITEMS:
        lines.append(f"    ... and {len(items) - SHOW_ITEMS} more (see audit.json)")


def _where(folder: str) -> str:
    """A split's source as the summary shows it: ``val/`` for a folder, ``train.csv`` for a manifest."""
    return folder if Path(folder).suffix.lower() in (".csv", ".json") else f"{folder}/"


def format_summary(report: Dict[str, Any]) -> str:
    """A readable multi-line summary of an ``audit_dataset`` report."""
    splits = report["splits"]
    total = sum(s["files"] for s in splits.values())
    lines = [f"Audit of {report['root']}: {_plural(total, 'file')}, {_plural(len(report['classes']), 'class')} "
             f"({report['seconds']:.1f} s, {report['settings']['workers']} workers)", ""]
    heads = [f"{name} ({_where(s['folder'])})" if name != s["folder"] else f"{name}/" for name, s in splits.items()]
    width = max([len(c) for c in report["classes"]] + [5])
    lines.append("  " + "class".ljust(width) + "".join(h.rjust(14) for h in heads))
    for c in report["classes"]:
        lines.append("  " + c.ljust(width) + "".join(str(s["counts"].get(c, 0)).rjust(14) for s in splits.values()))
    lines.append("  " + "total".ljust(width) + "".join(str(s["files"]).rjust(14) for s in splits.values()))
    if report["test_folder"] is None:
        lines.append("  (no test set: expected test/ or val/, split=test rows or data.test_manifest)")
    lines.append("")

    p = report["problems"]
    lines.append("Files training would refuse or fail on:")
    lines.append(f"  non-image: {len(p['non_image'])}, unreadable: {len(p['unreadable'])}, "
                 f"truncated: {len(p['truncated'])}, outside a class folder: {len(p['stray_files'])}, "
                 f"class folders linked onto another: {len(p['linked_classes'])}")
    _show(lines, p["non_image"] + [f"{e['path']}: {e['error']}" for e in p["unreadable"] + p["truncated"]]
          + p["stray_files"] + [f"{e['path']} -> {e['target']} ({e['overlap']})" for e in p["linked_classes"]])
    lines.append("Images worth a look (converted to RGB when loaded):")
    stored_gray = sum(e["mode"] in GRAYSCALE_MODES for e in p["grayscale"])
    lines.append(f"  grayscale: {len(p['grayscale'])} ({stored_gray} with a gray mode, "
                 f"{len(p['grayscale']) - stored_gray} stored as colour with equal channels)")
    lines.append(f"  CMYK: {len(p['cmyk'])}, palette: {len(p['palette'])}, other modes: {len(p['other_mode'])}, "
                 f"tiny (shorter side < {report['settings']['min_side']} px): {len(p['tiny'])}")
    _show(lines, [f"{e['path']} ({e['mode']})" for e in p["cmyk"] + p["palette"] + p["other_mode"]]
          + [f"{e['path']} ({e['width']}x{e['height']})" for e in p["tiny"]])
    if p["empty_classes"] or p["test_only_classes"]:
        lines.append(f"  empty class folders: {', '.join(p['empty_classes']) or 'none'}; "
                     f"test classes missing from train: {', '.join(p['test_only_classes']) or 'none'}")

    titles = {"exact_duplicates": "Byte-identical duplicates (sha256)",
              "near_duplicates": f"Near-duplicates (perceptual hash within {report['settings']['near_distance']} bits, bytes differ)"}
    names = {"within_class": "within a class", "across_classes": "across classes (label conflict)",
             "across_splits": "across train/test (leakage)"}
    for key, title in titles.items():
        table = report[key]
        lines.append(f"{title}: " + ", ".join(f"{names[k]} {_plural(len(table[k]), 'group')}" for k in DUPLICATE_KINDS))
        for kind in ("across_splits", "across_classes", "within_class"):
            _show(lines, [f"[{names[kind].split(' (')[0]}] " + " = ".join(g["files"]) for g in table[kind]])
    return "\n".join(lines)
