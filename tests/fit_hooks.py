"""Test-only callbacks for ``inat.training.loop.fit``: fault injection and per-rank digests.

In-process tests pass them to ``fit(..., callbacks=[...])``. Tests that run a command in a
subprocess (``run.py``, or a sweep whose launcher starts trial processes of its own) use
:func:`hook_env`: ``site_hooks/sitecustomize.py`` is then imported when every Python process
under that environment starts and registers the callbacks the environment names.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from inat.runs import world
from inat.training.callbacks import CALLBACKS, Callback

SITE_HOOKS = Path(__file__).resolve().parent / "site_hooks"
KILL_AFTER_EPOCH = "INAT_TEST_KILL_AFTER_EPOCH"


class KillAfterEpoch(Callback):
    """SIGKILL this process once epoch ``epoch`` (1-based) is checkpointed: a crash no handler sees."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, setup, record) -> None:
        if record["epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class RankDigest(Callback):
    """Each rank writes ``rank<k>.digest.json``: its final step, a hash of its parameters and its validation."""

    def on_finish(self, setup) -> None:
        s, (rank, _) = setup, world()
        h = hashlib.sha256()  # parameters only: BN running statistics are rank-local until DDP's next broadcast
        for name, tensor in sorted(s.model.named_parameters()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        last = s.state["history"][-1] if s.state["history"] else {}
        (s.writer.run_dir / f"rank{rank}.digest.json").write_text(json.dumps({
            "step": s.state["step"], "sha256": h.hexdigest(), "rebuilds": s.wrapper.rebuilds,
            "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
            "val_images": len(getattr(s.source, "val_labels", ()))}))


def hook_env(kill_after_epoch: int) -> dict:
    """Environment for a subprocess (and the processes it starts) whose fit SIGKILLs itself after that epoch."""
    path = os.pathsep.join(p for p in (str(SITE_HOOKS), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, KILL_AFTER_EPOCH: str(kill_after_epoch)}


def register_from_env() -> None:
    """Register the callbacks :func:`hook_env` asked for (called by ``site_hooks/sitecustomize.py``)."""
    if os.environ.get(KILL_AFTER_EPOCH):
        CALLBACKS.append(KillAfterEpoch(int(os.environ[KILL_AFTER_EPOCH])))
