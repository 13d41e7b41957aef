"""DDP that cannot hang or drift: rank 0 decides, every rank follows.

Every decision that ends or shapes training (the time budget, early stopping, pruning, a stop
signal, the schedule's progress) is taken on rank 0 and broadcast, so ranks never break out of the loop
at different steps (which hangs the next all-reduce) or apply different learning rates. The
DDP wrapper is rebuilt when the set of trainable parameters changes (gradual unfreezing):
DDP registers its all-reduce hooks only for parameters that required grad when it was built.

Those decisions and the setup barrier travel on a gloo group of CPU tensors, created once at
``init``: on NCCL a broadcast needs a CUDA tensor, whose host->device copy and ``.item()``
each wait for the stream, so every decision drained the GPU's queue of work.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from inat.runs import world

T = TypeVar("T")

# How long a rank waits for the others at a collective. While each node's local rank 0 downloads
# nature_12K (3.6 GB) and decodes the cache, the other ranks wait at local_first's barrier; NCCL's
# default 10 minutes (gloo's 30) aborted the job on a slow link or a large dataset. Two hours holds
# a first download at ~1 MB/s plus the decode; a rank that truly hangs is still reported, later.
COLLECTIVE_TIMEOUT = timedelta(hours=2)

# The gloo group for host-side collectives when the default group is NCCL (None: use the default).
_control: Optional[Any] = None


def init(device: torch.device) -> None:
    """Join torchrun's process group (NCCL bound to this rank's GPU, gloo on the CPU) and the control group."""
    _, world_size = world()
    if world_size <= 1:
        return
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    control_group()


def control_group() -> Optional[Any]:
    """The gloo group host-side collectives run on (None: the default group, already gloo).

    Created on first use, normally by ``init``; every rank reaches that first use at the same
    collective, which is what ``new_group`` needs.
    """
    global _control
    if _control is None and dist.get_backend() != "gloo":
        _control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return _control


def active() -> bool:
    """True when more than one process trains."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier(group=control_group())


def local_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on each node's local rank 0 first (download, cache build), then on the others.

    The others wait at a gloo barrier with ``COLLECTIVE_TIMEOUT``, not at an NCCL one.
    """
    if not active():
        return fn()
    local = int(os.environ.get("LOCAL_RANK", 0))
    result = fn() if local == 0 else None
    barrier()
    if local != 0:
        result = fn()  # finds the finished download / cache
    return result  # type: ignore[return-value]


def decide(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object); identity in one process."""
    if not active():
        return value
    box: List[Any] = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def gather(value: T) -> List[T]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in one process."""
    if not active():
        return [value]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=control_group())
    return out


def broadcast_float(value: float) -> float:
    """Rank 0's float on every rank (see :func:`broadcast_floats`)."""
    return broadcast_floats([value])[0]


def broadcast_floats(values: List[float]) -> List[float]:
    """Rank 0's floats on every rank, as one CPU tensor broadcast on the control group.

    Never on the run's device: a CUDA tensor here would sync the stream twice. One call carries
    several decisions (the budget's clock and the stop signal) for the price of one.
    """
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(t, src=0, group=control_group())
    return t.tolist()


def trainable_signature(model: nn.Module) -> tuple:
    """Which parameters require grad, as a hashable tuple (changes when groups are unfrozen)."""
    return tuple(p.requires_grad for p in model.parameters())


class Wrapper:
    """The module the optimizer step runs: the model, DDP around it, and torch.compile on top.

    ``refresh()`` rebuilds DDP when the trainable set changed since the last build, so layers
    that gradual unfreezing turns on are all-reduced like the rest.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, compile: bool = False) -> None:
        self.model, self.device, self.compile = model, device, compile
        self._signature: Optional[tuple] = None
        self.module: nn.Module = model
        self.rebuilds = 0

    def refresh(self) -> nn.Module:
        sig = trainable_signature(self.model)
        if sig == self._signature:
            return self.module
        self._signature = sig
        module: nn.Module = self.model
        if active():
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self.rebuilds += 1
        if self.compile:
            module = torch.compile(module)
        self.module = module
        return module


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm layers that average statistics across ranks (small per-GPU batches)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def destroy() -> None:
    global _control
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()  # every group, the control group with it
    _control = None
