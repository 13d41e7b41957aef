"""Once-per-epoch sums over the ranks: every rank gets the same totals (identity in one process).

One small tensor all-reduced on the default group, on the run's device (NCCL needs a CUDA
tensor): it waits for the device, which the caller is about to do anyway (validation reads
its metrics right after), so it costs nothing per step.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from inat.training import distributed


def sum_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    """Each position of ``values`` summed over the ranks, as floats, on every rank."""
    if not distributed.active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
