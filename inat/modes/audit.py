"""``python run.py +mode=audit [data.root=ROOT | data.manifest=FILE]``: audit the dataset, write audit.json.

Uses ``data.workers`` processes (0 = one per CPU). The audit reports problems; it does not
fail on them, so its exit code is 0 unless the root itself is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.data.audit import audit_dataset, format_summary
from inat.run_folder import AUDIT
from inat.runs import usable_cpus, write_json


def run(cfg: Any, out_dir: Path) -> None:
    report = audit_dataset(Path(cfg.data.root), workers=cfg.data.workers or usable_cpus(), data_cfg=cfg.data)
    path = Path(out_dir) / AUDIT
    write_json(path, report)
    print(format_summary(report))
    print(f"\nWrote {path}")
