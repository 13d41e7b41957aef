"""``python run.py +mode=sweep_report sweep.dir=SWEEP_DIR``: the sweep's plots, table and observations, into SWEEP_DIR."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.errors import InatError
from inat.run_folder import SWEEP_REPORT_HTML
from inat.sweep.report import build_report


def run(cfg: Any, out_dir: Path) -> None:
    if not cfg.sweep.dir:
        raise InatError("sweep_report needs the sweep folder: python run.py +mode=sweep_report sweep.dir=SWEEP_DIR")
    sweep_dir = Path(cfg.sweep.dir)
    if not sweep_dir.is_dir():
        raise InatError(f"sweep.dir '{sweep_dir}' is not a folder.")
    summary = build_report(sweep_dir, cfg.sweep.get("storage"), cfg.sweep.get("study_name"))
    print(f"sweep report: {sweep_dir / SWEEP_REPORT_HTML} ({', '.join(summary['files'].values())})")
    for o in summary["observations"]:
        print(f"- {o['text']}")
    if summary["best"]:
        print(f"best: {summary['best']['command']}")
