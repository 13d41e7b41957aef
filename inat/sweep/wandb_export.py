"""Export a Hydra/Optuna search space as a wandb sweep YAML, for users who prefer wandb agents.

``choice(a, b)`` -> ``values``; ``interval(a, b)`` -> uniform; ``tag(log, interval(a, b))`` ->
``log_uniform_values``; a plain ``key=value`` -> fixed ``value``. The command hands wandb's
choices to run.py as Hydra overrides (``${args_no_hyphens}`` = ``key=value``), with
``train.then_test=false``: like Optuna trials, wandb trials never read the test folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep


def wandb_sweep_config(params: Mapping[str, str], *, method: str = "bayes", metric: str = "best_val_accuracy",
                       extra_args: tuple[str, ...] = ("train.then_test=false",)) -> Dict[str, Any]:
    """The wandb sweep dict for Hydra sweeper ``params`` (``{key: "choice(...)"}``)."""
    parser = OverridesParser.create()
    parameters: Dict[str, Any] = {}
    for key, text in params.items():
        override = parser.parse_override(f"{key}={text}")
        value = override.value()
        if isinstance(value, ChoiceSweep):
            parameters[key] = {"values": list(override.sweep_string_iterator())
                               if any(isinstance(v, str) for v in value.list) else list(value.list)}
        elif isinstance(value, IntervalSweep):
            kind = "log_uniform_values" if "log" in value.tags else "uniform"
            int_like = isinstance(value.start, int) and isinstance(value.end, int)
            if int_like and kind == "uniform":
                kind = "int_uniform"
            parameters[key] = {"distribution": kind, "min": value.start, "max": value.end}
        elif isinstance(value, RangeSweep):
            parameters[key] = {"values": list(override.sweep_iterator())}
        else:
            parameters[key] = {"value": override.value()}
    return {
        "program": "run.py",
        "method": method,
        "metric": {"name": metric, "goal": "maximize"},
        "parameters": parameters,
        # run.py is a Hydra app: plain key=value arguments, not --key=value.
        "command": ["${env}", "${interpreter}", "${program}", *extra_args, "${args_no_hyphens}"],
    }


def write_wandb_sweep(params: Mapping[str, str], path: Path, **kwargs: Any) -> Path:
    """Write :func:`wandb_sweep_config` as YAML (``wandb sweep wandb_sweep.yaml`` then ``wandb agent``)."""
    path = Path(path)
    path.write_text("# wandb sweep of the inat Part A search space: wandb sweep THIS_FILE; wandb agent SWEEP_ID\n"
                    + yaml.safe_dump(wandb_sweep_config(params, **kwargs), sort_keys=False))
    return path


def preset_params(preset: Path | None = None) -> Dict[str, str]:
    """The ``params`` of ``conf/hydra/sweeper/optuna.yaml`` (the default Part A search space)."""
    preset = preset or Path(__file__).resolve().parents[2] / "conf" / "hydra" / "sweeper" / "optuna.yaml"
    return {str(k): str(v) for k, v in (yaml.safe_load(preset.read_text())["params"] or {}).items()}
