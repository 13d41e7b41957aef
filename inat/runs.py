"""Run folders: atomic writes, the metrics CSV, the run-folder lock, and distributed-rank facts."""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List

from inat.errors import InatError

LOCK_NAME = ".inat.lock"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, not the machine's count.

    Under SLURM (``--cpus-per-task``), ``taskset`` or a container's cpuset, ``os.cpu_count()``
    is every CPU of the node (128 on a big one) while the process may use 8: that many decode
    processes or threads would only contend for the 8.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


TEMP_GLOB = ".*.tmp"  # what temp_path's names match (fnmatch), e.g. for leftovers of an interrupted write


def temp_path(path: Path) -> Path:
    """A temp name beside ``path`` that no other process or thread will pick.

    Several sweep workers write the same ``sweep.json`` at once; with one shared temp name
    one worker's rename takes the file from under the other's.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def os_error_sentence(err: OSError, path: Path, what: str = "write") -> str:
    """One sentence for a filesystem error on ``path``: what failed, why, and what to do."""
    hints = {errno.ENOSPC: "free some space or choose another folder",
             errno.EFBIG: "the file is larger than this filesystem or process allows",
             errno.EROFS: "the filesystem is read-only; choose another folder",
             errno.EACCES: "check the folder's permissions or choose another folder",
             errno.EPERM: "check the folder's permissions or choose another folder",
             errno.EISDIR: "it is a directory; name a file instead",
             errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.EEXIST: "a file is in the way of a folder of that name"}
    hint = hints.get(err.errno, "check the path")
    return f"Could not {what} '{path}': {err.strerror or err} ({hint})."


def _write_failure(tmp: Path) -> OSError | None:
    """The OSError a further write to the half-written ``tmp`` meets (disk full, file too large), else None."""
    if not tmp.exists():
        return None
    try:
        with open(tmp, "ab") as fh:
            fh.write(bytes(1 << 16))
            fh.flush()
            os.fsync(fh.fileno())  # a delayed-allocation filesystem may only refuse the blocks here
    except OSError as err:
        return err
    return None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    On any error (ENOSPC half way through a checkpoint, a read-only folder, Ctrl-C) the
    temp file is removed, so a run folder never holds a torn file; filesystem errors
    become one InatError sentence naming ``path``, and so does the RuntimeError torch.save
    raises when the kernel refuses its writes.
    """
    path = Path(path)
    if path.is_dir():
        raise InatError(f"Could not write '{path}': it is a directory; name a file instead.")
    tmp = temp_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
        except OSError as err:
            raise InatError(os_error_sentence(err, path)) from err
        except RuntimeError as err:
            # torch.save reports a failed write (ENOSPC, EFBIG) as a RuntimeError without the errno
            # ("PytorchStreamWriter failed writing file ...", "unexpected pos ..."): ask the kernel.
            cause = _write_failure(tmp)
            if cause is None:
                raise
            raise InatError(os_error_sentence(cause, path)) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open`` for writing through ``atomic_path``: readers never see half a file."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    with atomic_open(path, "w") as fh:
        fh.write(json.dumps(data, indent=1, default=str))


def write_metrics(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` from the full history (small; keeps resume exact)."""
    if not rows:
        return
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class LockHeld(Exception):
    """``exclusive_file(wait=False)`` found the lock taken; ``holder`` is the text its holder wrote."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive_file(path: Path, *, wait: bool) -> Iterator[int]:
    """Hold an ``flock`` on ``path`` (created if needed) for the block and yield its descriptor.

    The lock dies with its process, so ``kill -9`` leaves no stale lock. The file is removed on
    release; a process that opened the old file before the removal sees another inode once it
    holds the lock, and locks the current file instead. ``wait=False`` raises ``LockHeld``
    when another process holds it; opening the file raises OSError for the caller to word.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we opened: lock the new one
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            Path(path).unlink()
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def acquire_run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir/.inat.lock`` (which names our pid) for the block; refuse a second live writer.

    An ``exclusive_file``: a run killed with ``kill -9`` leaves no stale lock, and its resume
    takes the folder back. The pid inside is only for the message.
    """
    run_dir = Path(run_dir)
    lock_path = run_dir / LOCK_NAME
    held = contextlib.ExitStack()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = held.enter_context(exclusive_file(lock_path, wait=False))
    except LockHeld as busy:
        raise InatError(f"Run folder '{run_dir}' is in use by another inat process (pid {busy.holder or 'unknown'}, "
                        f"lock file {lock_path}); wait for it to finish or choose another hydra.run.dir.") from None
    except OSError as err:
        raise InatError(os_error_sentence(err, lock_path, "lock")) from err
    with held:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path


def run_lock_holder(run_dir: Path) -> str | None:
    """The pid text of the live process holding ``run_dir``'s lock, or None when no process holds it.

    Only asks (a shared, non-blocking ``flock`` on a read-only descriptor, released at once):
    a reader never takes, truncates or removes a running run's lock file. A lock file left by
    a killed process is free, so it reads as None.
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing releases a shared lock we took
    return None


def world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` otherwise)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_multirun() -> bool:
    """True inside a Hydra multirun job (a sweep trial)."""
    try:  # Hydra loads here, not at the top: every layer imports runs.py, few need Hydra
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # outside Hydra (library use, tests)
        return False
