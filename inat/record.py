"""A refused command leaves an existing run folder's record as it found it.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` into the run folder
before any inat code runs. A command that inat then refuses (a second training into a folder
another process holds, a resume whose config or images differ) would leave itself as the
folder's record, which the report shows as "reproduce this run". So ``run.py`` remembers the
record of a folder named by ``hydra.run.dir`` before Hydra starts (``remember``), and the one
place a refused command exits (``inat.run``) puts it back (``restore_if_refused``) unless the
command wrote a checkpoint there: a command that trained owns the folder and its record.

Why not check everything before Hydra starts: some refusals (the images changed since the
split was made) are only known after hashing the data, deep inside the run; this covers every
refusal, present and future, in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from inat.run_folder import HYDRA_CONFIG, HYDRA_HYDRA, HYDRA_OVERRIDES, SPLIT
from inat.runs import atomic_path

# What a command writes before it may be refused: Hydra's record and the split manifest.
RECORD_FILES = (HYDRA_CONFIG, HYDRA_HYDRA, HYDRA_OVERRIDES, SPLIT)
# A command that replaced one of these trained in the folder (atomic writes: a new inode).
CHECKPOINTS = ("checkpoints/best.pt", "checkpoints/last.pt")


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass
class Kept:
    run_dir: Path
    files: Dict[str, Optional[bytes]] = field(default_factory=dict)  # None: absent before the command
    checkpoints: Dict[str, Optional[Tuple[int, int]]] = field(default_factory=dict)


_kept: Optional[Kept] = None


def remember(run_dir: Path) -> None:
    """Keep the record of ``run_dir`` if it already holds one (a folder that does not exist has none)."""
    global _kept
    run_dir = Path(run_dir)
    if not (run_dir / ".hydra").is_dir():
        return
    kept = Kept(run_dir)
    for name in RECORD_FILES:
        try:
            kept.files[name] = (run_dir / name).read_bytes()
        except OSError:
            kept.files[name] = None
    kept.checkpoints = {name: _identity(run_dir / name) for name in CHECKPOINTS}
    _kept = kept


def restore_if_refused() -> bool:
    """Put the remembered record back if this command wrote no checkpoint; True when it did so.

    Called on the way out of a refused command. Restoring is best effort: a folder that
    cannot be written now keeps what Hydra wrote, and the refusal's own sentence still stands.
    """
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return False
    if any(_identity(kept.run_dir / name) != before for name, before in kept.checkpoints.items()):
        return False  # the command trained here: the folder and its record are now its own

    for name, data in kept.files.items():
        path = kept.run_dir / name
        try:
            if data is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != data:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
        except Exception:  # noqa: BLE001 - see the docstring: the refusal must still be printed
            continue
    return True
