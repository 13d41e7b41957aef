"""inat: train, tune, test and explain image classifiers on folders of photos.

``inat.run(cfg)`` is the only entry point ``run.py`` uses; it dispatches on ``cfg.mode.name``
to ``inat/modes/<name>.py``'s ``run(cfg, out_dir) -> float | None``, imported lazily, so
``import inat`` stays light and a mode's heavy dependencies load only when that mode runs.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

from inat.errors import EXIT_RESUMABLE, InatError, Preempted
from inat.modes import NAMES as _MODE_NAMES  # a light module (no Hydra or torch at import)

__version__ = "0.1.0"

# mode name -> "module:function"; every command's entry file is inat/modes/<name>.py (see inat.modes).
MODES = {name: f"inat.modes.{name}:run" for name in _MODE_NAMES}


def output_dir() -> Path:
    """The Hydra run (or multirun job) folder of the current command."""
    # Hydra, inat.config and inat.record load inside the functions: this __init__ runs before every inat module
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg) -> Optional[float]:
    """Run the mode named by ``cfg.mode.name``; bad input exits with one sentence.

    Returns the value an Optuna sweep maximises (validation accuracy) for training runs. A
    training stopped by a stop signal (``last.pt`` written) exits with ``EXIT_RESUMABLE``.
    """
    name = cfg.mode.name
    if name not in MODES:
        _fail(f"Unknown mode '{name}': valid modes are {', '.join(sorted(MODES))}.")
    module, func = MODES[name].split(":")
    try:
        from inat.config import validate_config

        validate_config(cfg)  # run.py checked the command already; sweep trials' values are checked here
        fn = getattr(importlib.import_module(module), func)
        return fn(cfg, output_dir())
    except InatError as err:
        from inat.record import restore_if_refused

        restore_if_refused()  # a refused command leaves an existing run folder's record as it was
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(str(err))
    except Preempted as stop:
        if str(stop):  # rank 0's sentence; the other ranks exit with the same code, silently
            print(str(stop), file=sys.stderr, flush=True)
        sys.exit(EXIT_RESUMABLE)
    except KeyboardInterrupt:
        _fail("Interrupted.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
