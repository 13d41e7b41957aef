"""Checks on a sweep's settings that Optuna would otherwise answer with a traceback.

Light on purpose (Hydra's override parser only, no Optuna): ``inat.cli`` runs it before
Hydra starts a multirun, and the sweeper runs it again before creating the study.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep


def sweep_errors(n_trials: Any, params: Optional[Dict[str, Any]], arguments: Sequence[str]) -> List[str]:
    """Sentences for ``n_trials`` < 1 and every ``interval(low, high)`` with low >= high.

    ``params`` is ``hydra.sweeper.params`` (key -> sweep expression), ``arguments`` the
    command's own overrides; both may hold intervals.
    """
    errors: List[str] = []
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        errors.append(f"hydra.sweeper.n_trials must be an integer >= 1, got {n_trials}.")
    exprs = [f"{k}={v}" for k, v in (params or {}).items()] + [a for a in arguments if "interval(" in a]
    parser = OverridesParser.create()
    for expr in exprs:
        if "interval(" not in expr:
            continue
        try:
            (override,) = parser.parse_overrides([expr])
        except Exception as err:  # noqa: BLE001 - Hydra's parse errors are many types
            errors.append(f"Sweep override '{expr}' could not be parsed ({str(err).splitlines()[0]}).")
            continue
        sweep = override.value()
        if isinstance(sweep, IntervalSweep) and not float(sweep.start) < float(sweep.end):
            errors.append(f"{override.key_or_group}: interval({sweep.start}, {sweep.end}) is empty or inverted; "
                          f"write interval(LOW, HIGH) with LOW < HIGH, e.g. interval({sweep.end}, {sweep.start}).")
        elif isinstance(sweep, IntervalSweep) and "log" in (sweep.tags or set()) and float(sweep.start) <= 0:
            errors.append(f"{override.key_or_group}: tag(log, interval({sweep.start}, {sweep.end})) needs LOW > 0.")
    return errors
