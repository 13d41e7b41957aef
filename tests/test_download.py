"""Download, resume, checksum and safe unzip against a local HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest
from PIL import Image

from inat.data.download import download_file, ensure_dataset, prepare_dataset, safe_extract
from inat.errors import InatError

REPO = Path(__file__).resolve().parents[1]


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 255 - color, 64)).save(buf, format="PNG")
    return buf.getvalue()


def _dataset_zip(top: str = "inaturalist_12K") -> bytes:
    """A nature_12K-shaped archive: ``top/{train,val}/<class>/*.png`` (tiny PNGs)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, n in (("train", 3), ("val", 1)):
            for c, name in enumerate(("ant", "bee")):
                for i in range(n):
                    zf.writestr(f"{top}/{split}/{name}/{i}.png", _png(40 * c + 10 * i))
    return buf.getvalue()


class _Server:
    """Serves ``files`` with Range support; ``cut_after[path] = N`` drops the first response after N bytes.

    ``seconds_per_body`` > 0 sends each body in ten pieces over that many seconds (a slow link).
    """

    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.cut_after: Dict[str, int] = {}
        self.seconds_per_body = 0.0
        self.ignore_range = False
        self.requests: List[Dict[str, Optional[str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                if cut is not None:
                    # Simulate a dropped connection: part of the body, then close.
                    self.wfile.write(body[start:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if not server.seconds_per_body:
                    self.wfile.write(body[start:])
                    return
                step = max(1, (len(body) - start) // 10)
                for at in range(start, len(body), step):
                    self.wfile.write(body[at:at + step])
                    self.wfile.flush()
                    time.sleep(server.seconds_per_body / 10)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        # A short poll interval keeps shutdown (each test's teardown) fast.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server():
    srv = _Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_prepare_dataset_downloads_verifies_extracts_and_is_idempotent(server, tmp_path):
    data = _dataset_zip()
    server.files["/nature_12K.zip"] = data
    root = tmp_path / "data" / "nature_12K"
    out = prepare_dataset(root, server.url("/nature_12K.zip"), _sha(data), progress=False)
    assert out == root
    assert sorted(p.name for p in (root / "train").iterdir()) == ["ant", "bee"]
    assert len(list((root / "val").rglob("*.png"))) == 2
    # The zip is kept beside the root; no staging or .part files are left (only the empty lock file).
    assert sorted(p.name for p in root.parent.iterdir()) == ["nature_12K", "nature_12K.zip"]
    assert (root.parent / "nature_12K.zip").read_bytes() == data
    n = len(server.requests)
    assert prepare_dataset(root, server.url("/nature_12K.zip"), _sha(data), progress=False) == root
    assert len(server.requests) == n  # second call makes no request


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    data = os.urandom(300_000)
    server.files["/big.bin"] = data
    server.cut_after["/big.bin"] = 100_000
    dest = tmp_path / "big.bin"
    download_file(server.url("/big.bin"), dest, sha256=_sha(data), progress=False, backoff=0.01)
    assert dest.read_bytes() == data
    assert not (tmp_path / "big.bin.part").exists()
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = os.urandom(200_000)
    server.files["/big.bin"] = data
    server.cut_after["/big.bin"] = 50_000
    server.ignore_range = True
    dest = tmp_path / "big.bin"
    download_file(server.url("/big.bin"), dest, expected_size=len(data), progress=False, backoff=0.01)
    assert dest.read_bytes() == data
    assert len(server.requests) == 2


def test_part_already_complete_or_too_long(server, tmp_path):
    data = os.urandom(50_000)
    server.files["/f.bin"] = data
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data)  # killed after the last byte, before the rename
    download_file(server.url("/f.bin"), dest, sha256=_sha(data), progress=False, backoff=0.01)
    assert dest.read_bytes() == data and len(server.requests) == 1
    dest.unlink()
    (tmp_path / "f.bin.part").write_bytes(data + b"junk")  # longer than the file: start over
    download_file(server.url("/f.bin"), dest, sha256=_sha(data), progress=False, backoff=0.01)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.requests[1:]] == ["bytes=50004-", None]


def test_checksum_mismatch_is_refused_and_part_deleted(server, tmp_path):
    server.files["/x.zip"] = _dataset_zip()
    dest = tmp_path / "x.zip"
    with pytest.raises(InatError, match="sha256"):
        download_file(server.url("/x.zip"), dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_is_refused(server, tmp_path):
    server.files["/x.zip"] = b"abc"
    with pytest.raises(InatError, match="expected 4"):
        download_file(server.url("/x.zip"), tmp_path / "x.zip", expected_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_404_is_a_sentence(server, tmp_path):
    with pytest.raises(InatError, match="HTTP 404"):
        download_file(server.url("/missing.zip"), tmp_path / "m.zip", progress=False)


def test_corrupted_archive_is_refused_and_nothing_left(server, tmp_path):
    data = bytearray(_dataset_zip())
    # Flip bytes inside the first member's compressed data: the CRC check must catch it.
    offset = 30 + len("inaturalist_12K/train/ant/0.png") + 10
    for i in range(offset, offset + 8):
        data[i] ^= 0xFF
    zip_path = tmp_path / "bad.zip"
    zip_path.write_bytes(bytes(data))
    with pytest.raises(InatError, match="corrupted"):
        safe_extract(zip_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_not_a_zip_is_refused_through_prepare_dataset(server, tmp_path):
    server.files["/nature_12K.zip"] = b"this is not a zip file" * 100
    root = tmp_path / "nature_12K"
    with pytest.raises(InatError, match="corrupted"):
        prepare_dataset(root, server.url("/nature_12K.zip"), progress=False)
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nature_12K.zip"]


@pytest.mark.parametrize("name", ["../evil.txt", "top/../../evil.txt", "/abs/evil.txt"])
def test_path_traversal_is_refused(tmp_path, name):
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("top/train/a/ok.txt", b"fine")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    with pytest.raises(InatError, match="refused"):
        safe_extract(zip_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_symlink_member_is_refused(tmp_path):
    zip_path = tmp_path / "link.zip"
    info = zipfile.ZipInfo("top/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InatError, match="symbolic link"):
        safe_extract(zip_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.zip"]


def test_two_processes_sharing_the_data_folder_download_once(server, tmp_path):
    """Two nodes on one filesystem start at once: the second waits for the first, then finds the dataset."""
    data = _dataset_zip()
    server.files["/nature_12K.zip"] = data
    server.seconds_per_body = 2.0  # a slow link, so both processes are in prepare_dataset at the same time
    root = tmp_path / "shared" / "nature_12K"
    code = ("import sys; from pathlib import Path; from inat.data.download import prepare_dataset; "
            "prepare_dataset(Path(sys.argv[1]), sys.argv[2], sys.argv[3], progress=False)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), server.url("/nature_12K.zip"), _sha(data)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert len(server.requests) == 1  # the second process made no request: it found the dataset ready
    assert sorted(p.name for p in (root / "train").iterdir()) == ["ant", "bee"]
    assert len(list(root.rglob("*.png"))) == 8
    assert sorted(p.name for p in root.parent.iterdir()) == ["nature_12K", "nature_12K.zip"]


def test_ensure_dataset_only_downloads_the_default_root(server, tmp_path):
    cfg = SimpleNamespace(root=str(tmp_path / "mine"), download=True, url=server.url("/x.zip"), sha256=None)
    with pytest.raises(InatError, match=r"^Dataset root '.*mine' does not exist\.$"):
        ensure_dataset(cfg)
    assert server.requests == []
    data = _dataset_zip()
    server.files["/nature_12K.zip"] = data
    cfg = SimpleNamespace(root=str(tmp_path / "nature_12K"), download=False, url=server.url("/nature_12K.zip"), sha256=None)
    with pytest.raises(InatError, match="does not exist"):
        ensure_dataset(cfg)
    cfg.download = True
    assert ensure_dataset(cfg) == tmp_path / "nature_12K"
    assert (tmp_path / "nature_12K" / "train" / "ant").is_dir()


def test_download_mode_via_run_py(server, tmp_path):
    data = _dataset_zip(top="archive_top")
    server.files["/x.zip"] = data
    root = tmp_path / "flowers"
    out_dir = tmp_path / "hydra_out"
    proc = subprocess.run(
        [sys.executable, "run.py", "+mode=download", f"data.root={root}", f"data.url={server.url('/x.zip')}",
         f"hydra.run.dir={out_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (root / "train" / "bee").is_dir() and (root / "val" / "ant").is_dir()
    record = json.loads((out_dir / "download.json").read_text())
    assert record["sha256"] == _sha(data)
    assert record["bytes"] == len(data)
    assert record["url"] == server.url("/x.zip")
    assert Path(record["root"]) == root.resolve()
    assert record["sha256"] in proc.stdout
