"""An exponential moving average of a model's weights that never waits for the device.

``torch.optim.swa_utils.AveragedModel`` keeps its step count in a tensor: every update
copies it to the device once per (device, dtype) group and reads it back as a bool, and on
a GPU each of those is a host-device sync, two or three per step. Here the count is a Python
int and the update is one ``torch._foreach_lerp_`` over the floating-point parameters and
buffers plus a copy of the integer ones (BatchNorm's ``num_batches_tracked``), so the step
stays asynchronous.

The rule is AveragedModel's with ``get_ema_multi_avg_fn`` and ``use_buffers=True``: the first
update copies the model, later ones move each average ``1 - decay`` of the way to the model.
``state_dict`` has AveragedModel's layout (``n_averaged`` and ``module.<name>``), so
checkpoints written before this class (``ema_full``) load unchanged.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, List

import torch
import torch.nn as nn


class ModelEMA:
    """The running average of ``model``; ``module`` is the averaged copy that validation reads.

    The tensor lists are built once, so the model must be on its device (and in its memory
    format) before the EMA is made; loading weights later copies in place and keeps them valid.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model)
        self.steps = 0  # updates so far; a Python int, so reading it never syncs
        pairs = list(zip(_tensors(self.module), _tensors(model), strict=True))
        self._float_avg: List[torch.Tensor] = [a for a, m in pairs if a.is_floating_point()]
        self._float_src: List[torch.Tensor] = [m for a, m in pairs if a.is_floating_point()]
        self._other_avg: List[torch.Tensor] = [a for a, m in pairs if not a.is_floating_point()]
        self._other_src: List[torch.Tensor] = [m for a, m in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (the first update copies them)."""
        if self.steps == 0:
            torch._foreach_copy_(self._float_avg, self._float_src)
        elif self._float_avg:
            torch._foreach_lerp_(self._float_avg, self._float_src, 1.0 - self.decay)
        if self._other_avg:
            torch._foreach_copy_(self._other_avg, self._other_src)  # counters are copied, not averaged
        self.steps += 1

    def state_dict(self) -> Dict[str, Any]:
        """AveragedModel's layout: ``n_averaged`` (a 0-d int64 tensor) and ``module.<name>`` entries."""
        state: Dict[str, Any] = {"n_averaged": torch.tensor(self.steps, dtype=torch.long)}
        state.update({f"module.{k}": v for k, v in self.module.state_dict().items()})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` or from an AveragedModel's (older checkpoints' ``ema_full``)."""
        prefix = "module."
        self.module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.steps = int(state["n_averaged"])  # once, at resume


def _tensors(model: nn.Module) -> List[torch.Tensor]:
    """Parameters then buffers, detached (the average is updated in place, outside autograd)."""
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
