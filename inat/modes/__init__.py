"""The commands, one thin entry file each: ``inat/modes/<name>.py`` defines ``run(cfg, out_dir)``.

An entry file reads its own config section, calls the library, and prints what a user reads
on the console; the work (and every file it writes besides the entry's own record) is in the
library, which knows nothing about Hydra or the console. ``inat.run`` imports the entry named
by ``cfg.mode.name`` lazily, so one command's heavy dependencies load only when it runs.
"""
from __future__ import annotations

from typing import Any, List

NAMES = ("train", "test", "download", "audit", "info", "explain", "report", "sweep_report", "predict", "export",
         "detect", "lr_find", "runs")


def command_overrides() -> List[str]:
    """The command line's own overrides (``model=... data.root=...``); empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig  # here: inat/__init__ imports this module, and stays Hydra-free

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def data_root_overridden(key: str = "root") -> bool:
    """Whether ``data.root=`` (or ``data.<key>=``) is among the command's own overrides (test and
    explain then score that root, test mode that ``data.test_manifest``).

    Without it they use the root the checkpoint was trained on, not the config's default.
    """
    return any(o.startswith(f"data.{key}=") for o in command_overrides())
