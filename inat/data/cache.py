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
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from inat.data.images import decode_image
from inat.errors import InatError
from inat.runs import atomic_open, os_error_sentence, usable_cpus

# 2: EXIF orientation applied; a version-1 cache holds phone photos on their side.
CACHE_VERSION = 2


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
    path, size, interpolation, crop_pct = args
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # permission denied, vanished, I/O error: the user needs the file's name
        raise InatError(f"Image '{path}' could not be read ({err.strerror or err}); fix or remove it "
                        f"(+mode=audit lists every bad file).") from err
    return decode_image(io.BytesIO(data), size, interpolation, crop_pct, name=path), hashlib.sha1(data).hexdigest()


def _pool_context() -> multiprocessing.context.BaseContext:
    """How decode workers start: from a clean server process, never by forking this one.

    The cache is built after ``distributed.init`` and, in test mode, after the model went to the
    GPU: this process may hold a CUDA context and NCCL threads, and fork copies them in an
    unusable state (a fork with threads can deadlock; Python 3.12 warns). The server imports
    the decoder once and forks the workers from itself, so each starts with it loaded.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["inat.data.images"])  # taken into account when the server first starts
    return ctx


def load_or_build(paths: Sequence[Path], size: int, *, interpolation: str = "bilinear", crop_pct: float = 1.0,
                  directory: str = "", workers: int = 0, label: str = "images", progress: bool = True) -> ImageCache:
    """Return the cache for ``paths`` at ``size``, building it (in parallel) if needed."""
    folder = cache_dir(directory)
    key = cache_key(paths, size, interpolation, crop_pct)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    try:
        if folder.exists() and not folder.is_dir():
            raise InatError(f"The decode cache folder '{folder}' is a file; set data.cache_dir to a folder "
                            f"(or unset it to use $INAT_CACHE or ~/.cache/inat).")
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "w")
    except OSError as err:
        raise InatError(os_error_sentence(err, folder, "use the decode cache folder")[:-1] +
                        "; set data.cache_dir to a writable folder.") from err
    with lock:
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
    """Decode every file into a temp ``.npy`` with ordinary writes, then rename it into place.

    Ordinary ``write`` calls, not a memory map: on a full disk a write through a sparse
    mapping kills the process with SIGBUS, while ``write`` raises ENOSPC, which becomes one
    sentence; the temp files are removed on every error.
    """
    hashes: List[str] = [""] * len(paths)
    jobs = [(str(p), size, interpolation, crop_pct) for p in paths]
    n_workers = workers or usable_cpus()
    bar = tqdm(total=len(jobs), desc=f"decode {label} @{size}px (once)", unit="img", disable=not progress,
               mininterval=1.0)
    try:
        with atomic_open(npy, "wb") as out:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                       "fortran_order": False, "shape": (len(paths), size, size, 3)})
            if n_workers == 1 or len(jobs) < 64:
                results = map(_decode_one, jobs)
                pool = None
            else:
                pool = ProcessPoolExecutor(n_workers, mp_context=_pool_context())
                results = pool.map(_decode_one, jobs, chunksize=32)
            try:
                for i, (img, digest) in enumerate(results):  # in order: row i of the file is image i
                    out.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
                    hashes[i] = digest
                    bar.update()
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        with atomic_open(meta, "w") as fh:  # written last: its presence marks a complete cache
            fh.write(json.dumps({"version": CACHE_VERSION, "size": size, "n": len(paths),
                                 "paths": [str(p) for p in paths], "sha1": hashes}))
    except BaseException:
        if not meta.exists():
            npy.unlink(missing_ok=True)  # an array without its meta file must not stay behind
        raise
    finally:
        bar.close()
