"""Fetch a dataset archive and unpack it safely: resumable HTTP, checksums, guarded unzip.

``download_file`` streams a URL into ``dest.part`` (resuming with an HTTP Range request after
a dropped connection) and renames it to ``dest`` only once size and sha256 check out.
``safe_extract`` refuses archive members that would land outside the destination and never
leaves a half-written folder. ``prepare_dataset`` ties them together for nature_12K, whose
zip nests its splits under ``inaturalist_12K/``; ``ensure_dataset`` is what training calls.
The zip is kept beside the dataset after a successful extraction (``data/nature_12K.zip``),
so a damaged or deleted dataset folder can be rebuilt without downloading again; delete it
by hand to get the space back.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from inat.errors import InatError
from inat.runs import exclusive_file, os_error_sentence


class UnreachableError(InatError):
    """Every retry failed on the network (no connection, or a transfer that got nowhere), not on a bad reply."""


CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0
RETRIES = 5
BACKOFF_SECONDS = 1.0
TEST_FOLDER_NAMES = ("test", "val")
# nature_12K is the only dataset fetched without being asked: any other missing root is a typo.
DEFAULT_DATASET_NAME = "nature_12K"

# Errors after which a retry can succeed: the network, not the request, failed.
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


class _Incomplete(Exception):
    """The server closed the connection before sending the whole body (resumable)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so a multi-GB archive needs no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_range_start(value: Optional[str]) -> Optional[int]:
    m = re.match(r"bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def _check_complete(part: Path, dest: Path, url: str, sha256: Optional[str], expected_size: Optional[int]) -> None:
    """Size and checksum of a finished ``.part``; a mismatch deletes it so no retry reuses it."""
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise InatError(f"Download of '{url}' has {size} bytes, expected {expected_size}; the partial file was deleted.")
    if sha256:
        got = sha256_file(part)
        if got.lower() != sha256.lower():
            part.unlink(missing_ok=True)
            raise InatError(f"Download of '{url}' has sha256 {got}, expected {sha256}; the partial file was deleted.")
    os.replace(part, dest)


def _fetch_once(url: str, part: Path, expected_size: Optional[int], progress: bool) -> int:
    """One HTTP request appending to ``part``; returns bytes received, raises ``_Incomplete`` if cut short."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "inat-download/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Our .part is already as long as (or longer than) the file. It is complete only
            # if its length is the file's (``Content-Range: bytes */LEN``); else start over.
            m = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range") or "")
            size = int(m.group(1)) if m else expected_size
            if size is not None and offset == size:
                return 0
            part.unlink(missing_ok=True)
            raise _Incomplete("range not satisfiable") from err
        if 500 <= err.code < 600:
            raise
        raise InatError(f"Download of '{url}' failed: HTTP {err.code} {err.reason}.") from err
    with response:
        start = _content_range_start(response.headers.get("Content-Range"))
        if offset and (response.status != 206 or start != offset):
            # The server ignored our Range (200) or answered another one: restart cleanly
            # rather than append bytes from the wrong place.
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if total is not None and expected_size is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise InatError(f"Server reports {total} bytes for '{url}', expected {expected_size}; nothing was kept.")
        received = 0
        name = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1] or url
        with open(part, "ab" if offset else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress
        ) as bar:
            try:
                for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
            except http.client.IncompleteRead as err:
                fh.write(err.partial)
                received += len(err.partial)
                raise _Incomplete(f"connection closed after {offset + received} bytes") from err
    if total is not None and offset + received < total:
        raise _Incomplete(f"connection closed after {offset + received} of {total} bytes")
    return received


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    progress: bool = True,
    retries: int = RETRIES,
    backoff: float = BACKOFF_SECONDS,
) -> Path:
    """Download ``url`` to ``dest`` with resume, retries and verification; return ``dest``.

    Bytes go to ``dest.part``; after a dropped connection the next attempt asks for the rest
    with an HTTP Range request (a server that ignores Range makes it start over from byte 0).
    Up to ``retries`` consecutive failed attempts are retried, waiting ``backoff * 2**k``
    seconds; an attempt that made progress resets the count. The body length must match the
    server's Content-Length and ``expected_size``, and its sha256 must match ``sha256`` when
    given; on a mismatch the ``.part`` is deleted and InatError raised. The final rename is
    atomic, so ``dest`` existing means a complete download: it is then only re-verified.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256)):
        # Checked before any request: a typo would otherwise cost the whole download.
        raise InatError(f"data.sha256 must be 64 hexadecimal characters (the output of sha256sum), got '{sha256}'.")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if sha256 and sha256_file(dest).lower() != sha256.lower():
            # A stale file from another source: fetch the one the caller asked for.
            dest.unlink()
        else:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, expected_size, progress)
            break
        except (_Incomplete, *_TRANSIENT) as err:
            after = part.stat().st_size if part.exists() else 0
            # Count only attempts that got nowhere: a slow but moving transfer is not failing.
            failures = 0 if after > before else failures + 1
            if failures > retries:
                reason = getattr(err, "reason", None) or err
                raise UnreachableError(f"Download of '{url}' failed after {retries} retries: {reason}.") from err
            time.sleep(backoff * (2 ** max(failures - 1, 0)))
    _check_complete(part, dest, url, sha256, expected_size)
    return dest


def _unsafe_reason(info: zipfile.ZipInfo) -> Optional[str]:
    """Why a member must not be extracted, or None when it is a plain file or folder below the root."""
    name = info.filename
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute():
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a '..' component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def _check_member_tree(zip_path: Path, members: List[zipfile.ZipInfo]) -> None:
    """Refuse an archive in which a member's path runs through another member that is a file.

    ``a`` (a file) and ``a/b`` cannot both be extracted; found here, before anything is
    written, it is one sentence instead of ``NotADirectoryError`` half way through.
    """
    def parts(info: zipfile.ZipInfo) -> Tuple[str, ...]:
        return tuple(p for p in PurePosixPath(info.filename.replace("\\", "/")).parts if p not in ("", "."))

    files = {parts(i): i.filename for i in members if not i.is_dir()}
    for info in members:
        path = parts(info)
        for depth in range(1, len(path)):
            if path[:depth] in files:
                raise InatError(f"Archive '{zip_path}' was refused: member '{info.filename}' lies inside "
                                f"'{files[path[:depth]]}', which is a file in the same archive.")
        if info.is_dir() and path in files:
            raise InatError(f"Archive '{zip_path}' was refused: '{info.filename}' is both a file and a folder in it.")


def safe_extract(zip_path: Path, dest_dir: Path) -> Path:
    """Extract ``zip_path`` into ``dest_dir`` (which must not exist) safely; return ``dest_dir``.

    Every member is checked first: absolute paths, ``..`` components and symbolic links make
    the whole archive refused. Files are written into a temporary folder beside
    ``dest_dir`` and each member's CRC-32 is checked as it is read (the check
    ``ZipFile.testzip`` makes, in the same single pass), so a corrupted archive raises
    InatError and leaves nothing behind; the folder is renamed to ``dest_dir`` only at the end.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    if dest_dir.exists():
        raise InatError(f"Cannot extract '{zip_path}': '{dest_dir}' already exists.")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".partial", dir=dest_dir.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                members = zf.infolist()
                for info in members:
                    reason = _unsafe_reason(info)
                    if reason:
                        raise InatError(f"Archive '{zip_path}' was refused: member '{info.filename}' has {reason}.")
                _check_member_tree(zip_path, members)
                for info in members:
                    target = tmp.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # ZipExtFile checks the CRC-32 when the member is read to its end.
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK_BYTES)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
            raise InatError(f"Archive '{zip_path}' is corrupted ({err}); delete it and download again.") from err
        os.rename(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest_dir


def is_dataset_root(root: Path) -> bool:
    """True when ``root`` holds ``train/`` and a test folder (``test/`` or ``val/``)."""
    root = Path(root)
    return (root / "train").is_dir() and any((root / name).is_dir() for name in TEST_FOLDER_NAMES)


def archive_path(root: Path, url: str) -> Path:
    """Where the archive for ``root`` is kept: the URL's file name in ``root``'s parent."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not name.lower().endswith(".zip"):
        name = f"{Path(root).name}.zip"
    return Path(root).parent / name


def _find_split_parent(top: Path) -> Optional[Path]:
    """The shallowest folder under ``top`` that is a dataset root (e.g. ``inaturalist_12K/``)."""
    queue = [top]
    while queue:
        folder = queue.pop(0)
        if is_dataset_root(folder):
            return folder
        # macOS zips carry a __MACOSX/ shadow tree that mirrors the real one.
        queue += sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX")
    return None


def prepare_dataset(root: Path, url: str, sha256: Optional[str] = None, *, progress: bool = True) -> Path:
    """Make ``root`` a dataset root by downloading and extracting the zip at ``url``; return it.

    Idempotent: a root that already has ``train/`` and ``val/`` or ``test/`` returns at once
    without any request. Otherwise the zip is downloaded into ``root``'s parent (kept there
    afterwards), extracted into a hidden staging folder, and the shallowest folder in it that
    holds ``train/`` plus ``val/`` or ``test/`` (``inaturalist_12K/`` in nature_12K.zip) is
    renamed to ``root``. An empty ``root`` folder is replaced; a non-empty one is refused.

    Processes sharing ``root``'s parent (two nodes on one filesystem, two runs started at once)
    take turns under a file lock there: the second waits, then finds the dataset ready,
    instead of writing the same ``.part`` and staging folder under the first one's feet.
    """
    root = Path(root)
    if is_dataset_root(root):
        return root
    with _exclusive(root.parent / f".{root.name}.lock"):
        if is_dataset_root(root):  # prepared by the process this one waited for
            return root
        return _download_and_extract(root, url, sha256, progress)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Wait for, then hold, the download lock (``runs.exclusive_file``: removed on release, so a
    refused or finished download leaves nothing beside the dataset)."""
    held = contextlib.ExitStack()
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        held.enter_context(exclusive_file(lock_path, wait=True))
    except OSError as err:
        raise InatError(os_error_sentence(err, lock_path, "create the download lock")) from err
    with held:
        yield


def _download_and_extract(root: Path, url: str, sha256: Optional[str], progress: bool) -> Path:
    """``prepare_dataset``'s work, under its lock: refuse a non-empty root, download, extract, rename."""
    if root.exists():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        else:
            raise InatError(
                f"Dataset root '{root}' exists but has no 'train' and 'val' or 'test' folders; "
                f"move it away or choose another data.root."
            )
    target = archive_path(root, url)
    try:
        zip_path = download_file(url, target, sha256=sha256, progress=progress)
    except UnreachableError as err:  # a checksum or HTTP status problem needs no hint: its message says it all
        raise InatError(f"{str(err).rstrip('.')}. Without a network, fetch the archive on another machine and put "
                        f"it at '{target}' (the next run extracts it), or set data.root to a folder with train/ and "
                        f"val/ or test/.") from err
    staging = root.parent / f".{root.name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)  # left over from a killed run
    safe_extract(zip_path, staging)
    try:
        found = _find_split_parent(staging)
        if found is None:
            raise InatError(f"Archive '{zip_path}' has no folder with 'train' and 'val' or 'test' inside.")
        os.rename(found, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_dataset(data_cfg: Any) -> Path:
    """The dataset root of ``data_cfg``, downloading nature_12K first when it is missing.

    Only the default root (a folder named ``nature_12K``) is fetched, and only when
    ``data_cfg.download`` is true: a missing custom root is far more often a typo than a
    request to download 3.6 GB, so it raises InatError instead.
    """
    root = Path(data_cfg.root)
    if root.exists():
        return root
    if data_cfg.download and root.name == DEFAULT_DATASET_NAME:
        return prepare_dataset(root, data_cfg.url, data_cfg.sha256)
    raise InatError(f"Dataset root '{root}' does not exist.")


def fetch_dataset(root: Path, url: str, sha256: Optional[str] = None) -> Dict[str, Any]:
    """Fetch and extract ``url`` into ``root`` (``prepare_dataset``) and return download.json's record.

    The record holds the URL, the root, the archive path, its size in bytes and its sha256
    as computed here (null when the root was already present and no archive is kept), whether
    anything was downloaded or extracted, and the seconds it took.
    """
    root = Path(root)
    zip_path = archive_path(root, url)
    was_present = is_dataset_root(root)
    had_archive = zip_path.exists()
    started = time.perf_counter()
    prepare_dataset(root, url, sha256)
    seconds = time.perf_counter() - started
    kept = zip_path.exists()
    return {
        "url": url,
        "root": str(root.resolve()),
        "archive": str(zip_path.resolve()) if kept else None,
        "bytes": zip_path.stat().st_size if kept else None,
        "sha256": sha256_file(zip_path) if kept else None,
        "downloaded": not was_present and not had_archive,
        "extracted": not was_present,
        "seconds": round(seconds, 2),
    }
