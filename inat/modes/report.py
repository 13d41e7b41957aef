"""``python run.py +mode=report report.inputs=[RUN_OR_SWEEP,...] report.out=FILE``: the one HTML report.

``report.out`` is relative to the current directory, not the Hydra output folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.report import build_report
from inat.report.html import pct


def run(cfg: Any, out_dir: Path) -> None:
    r = cfg.report
    result = build_report(list(r.inputs), Path(r.out), out_dir, title=str(r.title), explain=bool(r.explain))
    size_kb = Path(result["out"]).stat().st_size / 1024
    print(f"report: {result['out']} ({size_kb:.0f} KB; {result['runs']} runs, {result['sweeps']} sweeps; "
          f"best {result['best_run']} val {pct(result['best_val_accuracy'])} test {pct(result['test_accuracy'])})",
          flush=True)
