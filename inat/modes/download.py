"""``python run.py +mode=download``: fetch and extract ``data.url`` into ``data.root``; write download.json.

Paste the printed sha256 into ``data.sha256`` to pin the archive.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.data.download import fetch_dataset
from inat.run_folder import DOWNLOAD
from inat.runs import write_json


def run(cfg: Any, out_dir: Path) -> None:
    root = Path(cfg.data.root)
    record = fetch_dataset(root, cfg.data.url, cfg.data.sha256)
    path = Path(out_dir) / DOWNLOAD
    write_json(path, record)
    if not record["extracted"]:
        print(f"Dataset root '{root}' already has train/ and a test folder: nothing to do.")
    else:
        action = "reused" if not record["downloaded"] else f"downloaded {record['bytes']:,} bytes from {record['url']} into"
        print(f"{action.capitalize()} '{record['archive'] or cfg.data.url}' and extracted it to '{root}' in {record['seconds']:.1f} s.")
    if record["sha256"]:
        print(f"sha256 {record['sha256']} (set data.sha256 to pin it)")
    print(f"Wrote {path}")
