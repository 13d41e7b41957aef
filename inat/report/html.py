"""The report page: one self-contained HTML file (PNGs inlined as base64, inline CSS, no CDN).

Each section answers one of the assignment's questions from the data it was given, and
says so plainly when the data for a question was not among the inputs.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #3182bd;padding-bottom:6px}h2{margin-top:36px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:10px 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f2f6fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:6px 0}code,pre{background:#f6f8fa;font-size:13px}
pre{padding:8px;overflow-x:auto}.key{font-size:20px;font-weight:bold;color:#08519c}.note{color:#666;font-size:13px}
figure{margin:12px 0}figcaption{color:#555;font-size:13px}
"""

# Sets data-images-* on <body> once every image settled; the browser test reads them.
CHECK_IMAGES = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-ok', ok === imgs.length ? 'true' : 'false');
});
"""


def pct(value: Optional[float]) -> str:
    """A fraction as a percentage with one decimal (0.4734 -> '47.3%'); '–' when unknown."""
    return "–" if value is None else f"{100 * float(value):.1f}%"


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value))


def img(data: bytes | Path, alt: str) -> str:
    """An <img> with the PNG inlined as a data URI, so the file needs nothing else."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(raw).decode("ascii")}">'


def figure(data: bytes | Path, caption: str) -> str:
    """An inlined image with a caption."""
    return f"<figure>{img(data, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """A plain table; cells are escaped unless given as ``Raw``; columns in ``numeric`` right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell.html if isinstance(cell, Raw) else esc(cell)
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class Raw:
    """Already-safe HTML for a table cell."""

    def __init__(self, html_text: str) -> None:
        self.html = html_text


def pre_json(data: Any) -> str:
    """Pretty JSON in a <pre> block."""
    return f"<pre>{esc(json.dumps(data, indent=1, default=str))}</pre>"


def page(title: str, sections: List[str]) -> str:
    """The whole document."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style><script>{CHECK_IMAGES}</script></head><body>"
            f"<h1>{esc(title)}</h1>{''.join(sections)}</body></html>")
