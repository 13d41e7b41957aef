"""Optuna's fANOVA importance, made to run on Optuna 2.10 with NumPy >= 1.24.

Optuna 2.10's ``_FanovaTree._get_node_value`` returns scikit-learn's ``tree_.value[node]``,
an array of shape ``(n_outputs, max_n_classes)`` = ``(1, 1)`` for the forest's regression
trees, and ``_precompute_statistics`` stores it with ``statistics[node] = [value, weight]``.
That list mixes a 2-D array with a float: NumPy < 1.24 converted it (with a deprecation
warning), NumPy >= 1.24 (2.x here) refuses it ("setting an array element with a sequence"),
so every importance call failed. Later Optuna versions read the node value as a float, which
is what :class:`FanovaTree` does; nothing else about the algorithm changes. The project stays
on Optuna 2.x because the Hydra Optuna sweeper plugin needs it (requirements.txt).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional
from unittest import mock

from optuna.importance import FanovaImportanceEvaluator
from optuna.importance._fanova import _fanova
from optuna.importance._fanova._tree import _FanovaTree
from optuna.study import Study


class FanovaTree(_FanovaTree):
    """Optuna's fANOVA tree with the leaf value read as a float (see the module docstring)."""

    def _get_node_value(self, node_index: int) -> float:
        return float(self._tree.value[node_index].reshape(-1)[0])  # (n_outputs, max_n_classes) = (1, 1)


class FanovaEvaluator(FanovaImportanceEvaluator):
    """``FanovaImportanceEvaluator`` whose forest's trees are :class:`FanovaTree`."""

    def evaluate(self, study: Study, params: Optional[List[str]] = None, *,
                 target: Optional[Callable[[Any], float]] = None) -> Dict[str, float]:
        # _Fanova.fit builds its trees through the module's name _FanovaTree: swap it for this call only.
        with mock.patch.object(_fanova, "_FanovaTree", FanovaTree):
            return super().evaluate(study, params, target=target)
