"""Render a report in headless Chromium: the DOM after scripts ran, and a screenshot.

The report page carries a small script that, once every ``<img>`` has settled, sets
``data-images-loaded`` / ``data-images-total`` / ``data-images-ok`` on ``<body>``;
``dump_dom`` returns the DOM after that script ran, so a test can read the attributes.
Chromium runs with a fresh profile and no background networking, so the check proves the
file works offline.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from inat.errors import InatError

INSTALL_HINT = "install it with `apt-get install chromium` (Debian/Ubuntu) or set INAT_CHROMIUM=/path/to/chromium"


def find_chromium() -> Optional[str]:
    """Path of a Chromium/Chrome binary: $INAT_CHROMIUM, else the usual names on PATH."""
    env = os.environ.get("INAT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: List[str], timeout: float) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise InatError(f"Chromium was not found: {INSTALL_HINT}.")
    with tempfile.TemporaryDirectory(prefix="inat-chromium-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise InatError(f"Chromium exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def dump_dom(html: Path, timeout: float = 60.0) -> str:
    """The page's DOM after load and its scripts (virtual time lets the load handlers finish)."""
    return _run(["--virtual-time-budget=5000", "--dump-dom", Path(html).resolve().as_uri()], timeout).stdout


def screenshot(html: Path, png: Path, width: int = 1100, height: int = 1800, timeout: float = 60.0) -> Path:
    """A PNG of the top ``width`` x ``height`` pixels of the page."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(["--virtual-time-budget=5000", f"--window-size={width},{height}", f"--screenshot={png}",
          Path(html).resolve().as_uri()], timeout)
    if not png.is_file():
        raise InatError(f"Chromium did not write the screenshot '{png}'.")
    return png
