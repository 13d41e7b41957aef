"""Run folders: atomic JSON writes, the metrics CSV, and distributed-rank facts."""
from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List


def temp_path(path: Path) -> Path:
    """A temp name beside ``path`` that no other process or thread will pick.

    Several sweep workers write the same ``sweep.json`` at once; with one shared temp name
    one worker's rename takes the file from under the other's.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def write_metrics(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` from the full history (small; keeps resume exact)."""
    if not rows:
        return
    tmp = temp_path(Path(path))
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` otherwise)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def in_multirun() -> bool:
    """True inside a Hydra multirun job (a sweep trial)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # outside Hydra (library use, tests)
        return False
