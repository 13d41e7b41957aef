"""The run's time budget, schedule progress and stop signals, as rank 0 sees them.

``train_one_epoch`` (``inat.training.loop``) ticks the budget every step: the schedule's
progress is the larger of steps done and time spent (``train.max_minutes``), and a stop signal
(``inat.training.preemption``) ends the epoch after the current step.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from inat.training import distributed


class Budget:
    """Training time, schedule progress and stop signals as rank 0 sees them.

    In one process the clock and ``stop_requested()`` are read every step (no device sync).
    Under DDP rank 0's elapsed time and whether rank 0 was signalled travel in one broadcast
    every ``every`` steps, so every rank applies the same learning rate and stops at the same
    step, for the time budget or a signal.
    """

    def __init__(self, seconds: float, total_steps: int, device: torch.device, every: int = 8,
                 stop_requested: Optional[Callable[[], bool]] = None) -> None:
        self.seconds, self.total_steps, self.device = seconds, max(1, total_steps), device
        self.every = every if distributed.active() else 1
        self.spent, self.t0, self.elapsed = 0.0, 0.0, 0.0
        self.stop_requested = stop_requested or (lambda: False)
        self._stop_seen = False  # rank 0's stop_requested() at the last tick (DDP)

    def start(self, spent: float) -> None:
        self.spent, self.t0, self.elapsed = spent, time.perf_counter(), spent

    def tick(self, step_in_epoch: int) -> None:
        if step_in_epoch % self.every == 0:
            elapsed, stop = distributed.broadcast_floats([self.spent + time.perf_counter() - self.t0,
                                                          float(self.stop_requested())])
            self.elapsed, self._stop_seen = elapsed, stop > 0

    @property
    def stop(self) -> bool:
        """Stop after this step for a signal: now in one process, as of the last tick under DDP."""
        return self._stop_seen if distributed.active() else self.stop_requested()

    def progress(self, step: int) -> float:
        p = step / self.total_steps
        return min(1.0, max(p, self.elapsed / self.seconds) if self.seconds > 0 else p)

    @property
    def over(self) -> bool:
        return self.seconds > 0 and self.elapsed >= self.seconds

    def epoch_seconds(self) -> float:
        """This epoch's training seconds, rank 0's on every rank."""
        return distributed.broadcast_float(time.perf_counter() - self.t0)
