"""Stop signals: SIGTERM, SIGUSR1 and SIGUSR2 end training at a step boundary, resumably.

A cluster that preempts a job, or whose time limit is near, sends a signal and, a grace period
later, SIGKILL: SLURM sends SIGTERM, ``--signal=USR2@T`` (submitit, ``hydra/launcher=slurm``)
SIGUSR2, and some sites SIGUSR1. ``fit`` holds :class:`StopSignals` around training, installed
from the main thread only (Python handles signals there). The handler only records the signal:
a checkpoint written from inside a handler could interrupt a ``torch.save`` or an optimizer step
half-way. The loop reads the record between steps (``Budget``, rank 0's on every rank), writes
``last.pt`` with its position inside the epoch, and raises :class:`inat.errors.Preempted`; the
command exits with ``EXIT_RESUMABLE``.

A handler installed before ``fit`` that is a function (submitit's, which requeues the job on
SIGUSR2 and logs and ignores SIGTERM) gets the signal once ``last.pt`` is written and the previous
handlers are back: it may exit (submitit requeues, then ``sys.exit``); if it returns, the run
still stops with ``Preempted``, since the scheduler's SIGKILL follows its signal.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, List, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """Records the stop signals received while installed; a context manager that restores the previous handlers."""

    def __init__(self) -> None:
        self.received: List[int] = []  # in arrival order, each signal once
        self.previous: Dict[int, Any] = {}  # signal -> the handler fit found (kept after restore)
        self._installed = False

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def names(self) -> str:
        """The received signals as people write them ("SIGTERM", "SIGUSR2 and SIGTERM")."""
        return " and ".join(signal.Signals(s).name for s in self.received) or "no signal"

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum not in self.received:
            self.received.append(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            for sig, handler in self.previous.items():
                # None: a handler not installed from Python; the default is the closest we can put back.
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._installed = False

    def hand_over(self) -> None:
        """Call the handler each received signal had before ``fit`` (a function, not SIG_DFL or SIG_IGN).

        Called once ``last.pt`` is written and the handlers are restored; a handler that exits
        (submitit's requeue) ends the process here.
        """
        for sig in self.received:
            handler = self.previous.get(sig)
            if callable(handler):
                handler(sig, None)
