"""Decode once: a memory-mapped uint8 tensor cache per (file list, size, interpolation).

Every image is decoded and resized once; later epochs, runs and sweep trials read the
``.npy`` memory map. The key hashes the file list with sizes and mtimes, so a changed,
added or removed file gives a new cache. Builds are atomic (temp file + rename, with a file
lock) so two processes starting at once do not corrupt or duplicate the work.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from inat.errors import InatError

CACHE_VERSION = 1


@dataclass
class ImageCache:
    """``images[i]`` is file ``i`` as (S, S, 3) uint8; ``sha1[i]`` hashes its bytes."""

    images: np.ndarray
    sha1: List[str]
    path: Path


def cache_dir(configured: str) -> Path:
    """The cache folder: ``data.cache_dir``, else ``$INAT_CACHE``, else ``~/.cache/inat``."""
    return Path(configured or os.environ.get("INAT_CACHE") or Path.home() / ".cache" / "inat").expanduser()


def cache_key(paths: Sequence[Path], size: int, interpolation: str, crop_pct: float) -> str:
    """Hash of the file list (absolute path, byte size, mtime) and the decode settings."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{interpolation}|{crop_pct}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _decode_one(args: Tuple[str, int, str, float]) -> Tuple[np.ndarray, str]:
    from inat.data.images import decode_image

    path, size, interpolation, crop_pct = args
    data = Path(path).read_bytes()
    return decode_image(io.BytesIO(data), size, interpolation, crop_pct, name=path), hashlib.sha1(data).hexdigest()


def load_or_build(paths: Sequence[Path], size: int, *, interpolation: str = "bilinear", crop_pct: float = 1.0,
                  directory: str = "", workers: int = 0, label: str = "images", progress: bool = True) -> ImageCache:
    """Return the cache for ``paths`` at ``size``, building it (in parallel) if needed."""
    folder = cache_dir(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size, interpolation, crop_pct)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the finished cache
        if not (npy.exists() and meta.exists()):
            _build(paths, size, interpolation, crop_pct, npy, meta, workers, label, progress)
    info = json.loads(meta.read_text())
    images = np.load(npy, mmap_mode="r")
    if images.shape != (len(paths), size, size, 3):
        raise InatError(f"Cache '{npy}' has shape {images.shape}, expected {(len(paths), size, size, 3)}; delete it.")
    return ImageCache(images, info["sha1"], npy)


def _build(paths: Sequence[Path], size: int, interpolation: str, crop_pct: float, npy: Path, meta: Path,
           workers: int, label: str, progress: bool) -> None:
    from tqdm import tqdm

    tmp = npy.with_name(f"{npy.stem}.{os.getpid()}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    hashes: List[str] = [""] * len(paths)
    jobs = [(str(p), size, interpolation, crop_pct) for p in paths]
    n_workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=f"decode {label} @{size}px (once)", unit="img", disable=not progress,
               mininterval=1.0)
    try:
        if n_workers == 1 or len(jobs) < 64:
            results = map(_decode_one, jobs)
            for i, (img, digest) in enumerate(results):
                out[i], hashes[i] = img, digest
                bar.update()
        else:
            with ProcessPoolExecutor(n_workers) as pool:
                for i, (img, digest) in enumerate(pool.map(_decode_one, jobs, chunksize=32)):
                    out[i], hashes[i] = img, digest
                    bar.update()
        out.flush()
        del out
        os.replace(tmp, npy)
        meta_tmp = meta.with_suffix(f".{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps({"version": CACHE_VERSION, "size": size, "n": len(paths),
                                        "paths": [str(p) for p in paths], "sha1": hashes}))
        os.replace(meta_tmp, meta)  # written last: its presence marks a complete cache
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
