"""README figures are shown at a size a reader can read: near their own pixel width, or page-wide."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGE = 700  # px: about the width of a rendered README column; wider than this is as large as it gets


def test_every_readme_image_exists_and_is_shown_large_enough():
    tags = re.findall(r'<img src="([^"]+)" width="(\d+)">', (ROOT / "README.md").read_text())
    assert len(tags) >= 5
    small = []
    for src, width in tags:
        native = Image.open(ROOT / src).width
        if int(width) < min(PAGE, 0.8 * native):  # text drawn at 8 pt becomes unreadable below ~80%
            small.append(f"{src}: shown {width} px of {native}")
    assert small == []
