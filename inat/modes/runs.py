"""``python run.py +mode=runs runs.root=outputs [runs.sort=KEY] [runs.out=FILE]``: the table of every run.

Finds every run folder and sweep under ``runs.root`` (``inat.runs_table``), prints one table
(the config keys that differ between runs, best val, test, macro-F1, ECE, epochs, img/s,
precision, device, hardware, seed group, status) and one line per seed group (runs equal but
for ``runs.repeat_keys``: mean ± std (n) and a 95% t interval), and writes the same table as
CSV to ``runs.out`` (relative to the current directory), by default ``runs.csv`` in this
command's own output folder (``outputs/runs/<date>/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.errors import InatError
from inat.run_folder import RUNS_CSV
from inat.runs_table import build_table, format_table, write_csv


def run(cfg: Any, out_dir: Path) -> None:
    r = cfg.runs
    if not r.root:
        raise InatError("runs needs the folder to read: python run.py +mode=runs runs.root=outputs")
    table = build_table(Path(r.root), sort=str(r.sort), repeat_keys=[str(k) for k in r.repeat_keys])
    path = write_csv(table, Path(r.out) if r.out else Path(out_dir) / RUNS_CSV)
    print(format_table(table))
    groups = len(table.groups)
    print(f"\n{len(table.rows)} runs, {groups} seed group{'' if groups == 1 else 's'}; wrote {path}", flush=True)
