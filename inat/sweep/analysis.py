"""Numbers behind the sweep report: a trial table, correlations, fANOVA importance.

Everything is computed from the trial folders (and the Optuna study when it can be opened);
the observations built from these numbers are in :mod:`inat.sweep.observations`.
"""
from __future__ import annotations

import datetime as dt
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from inat.run_folder import HYDRA_OVERRIDES, read_sweep
from inat.sweep.trials import Trial

# Keys a trial sets that are not hyperparameters (never shown as searched dimensions).
NOT_PARAMS = ("wandb.", "hydra.", "sweep.", "data.root", "data.workers", "data.cache_dir", "train.threads")


def parse_value(text: str) -> Any:
    """An override's value as Python: true/false, int, float, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip().strip("'\"")


@dataclass
class Row:
    """One trial as the report sees it."""

    number: int
    state: str  # complete | pruned | budget | running
    params: Dict[str, Any]
    val_accuracy: Optional[float]
    val_loss: Optional[float]
    epochs: int
    train_seconds: float
    started: Optional[dt.datetime]
    stop_reason: str
    path: str
    max_minutes: float = 0.0  # the trial's per-run time limit (0 = none)


@dataclass
class SweepData:
    """A sweep folder read for reporting."""

    sweep_dir: Path
    info: Dict[str, Any]
    rows: List[Row]
    param_names: List[str]
    fixed: Dict[str, str]
    study: Any = None
    study_error: Optional[str] = None
    epochs_planned: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> List[Row]:
        """Trials that trained and finished (complete or pruned): what statistics use."""
        return [r for r in self.rows if r.state in ("complete", "pruned") and r.val_accuracy is not None]


def _state(t: Trial) -> str:
    if not t.finished:
        return "running"
    if t.budget_stopped:
        return "budget"
    return "pruned" if t.pruned else "complete"


def open_study(info: Dict[str, Any], storage: Optional[str] = None, study_name: Optional[str] = None) -> Any:
    """The sweep's Optuna study from ``storage`` (or sweep.json's), None when none is recorded."""
    import optuna

    url = storage or info.get("storage")
    if not url:
        return None
    if "***" in url:
        raise ValueError("the storage URL in sweep.json hides its password; pass sweep.storage=URL")
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        # SQLite would create an empty file on connect: reading a sweep must not write into it.
        raise FileNotFoundError(f"no study file at {url[len('sqlite:///'):]} (trial folders or trials.csv only)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name or info.get("study_name"), storage=url)


def load_sweep(sweep_dir: Path, storage: Optional[str] = None, study_name: Optional[str] = None) -> SweepData:
    """The sweep's trials (via :func:`inat.run_folder.read_sweep`) and, if reachable, its study.

    Trial start times come from the study when it opens, else from a compact trials.csv's
    recorded column, else from the time Hydra wrote each trial's overrides.yaml.
    """
    sweep_dir = Path(sweep_dir)
    record = read_sweep(sweep_dir)
    info = record.info
    trials = [Trial(n, r) for n, r in record.trials.items()]
    study, error = None, None
    try:
        study = open_study(info, storage, study_name)
    except Exception as err:  # noqa: BLE001 - the folders alone still make a report
        error = f"{type(err).__name__}: {err}"
    started = {}
    if study is not None:
        started = {t.number: t.datetime_start for t in study.get_trials(deepcopy=False)}
    searched = list(info.get("params", {}))
    if not searched:  # no sweep.json: the keys whose override differs between trials
        keys = {k for t in trials for k in t.overrides}
        searched = sorted(k for k in keys if len({t.overrides.get(k) for t in trials}) > 1)
    names = [k for k in searched if not k.startswith(NOT_PARAMS)]
    fixed: Dict[str, str] = {}
    for t in trials:
        for k, v in t.overrides.items():
            if k not in names:
                fixed.setdefault(k, v)
    rows = []
    for t in trials:
        when = started.get(t.number) or t.record.started
        overrides_file = t.path / HYDRA_OVERRIDES
        if when is None and overrides_file.is_file():  # written by Hydra as the job starts
            when = dt.datetime.fromtimestamp(overrides_file.stat().st_mtime)
        seconds = t.summary.train_seconds if t.summary is not None else ((t.curve[-1].seconds or 0.0) if t.curve else 0.0)
        rows.append(Row(t.number, _state(t), {k: parse_value(t.overrides[k]) for k in names if k in t.overrides},
                        t.best_val_accuracy if t.curve or t.summary else None, t.best_val_loss(), t.epochs,
                        float(seconds), when, t.stop_reason, str(t.path), _max_minutes(t)))
    planned = next((int(t.summary.config_value("train.epochs")) for t in trials
                    if t.summary is not None and t.summary.config_value("train.epochs")), None)
    return SweepData(sweep_dir, info, rows, names, fixed, study, error, planned)


def _max_minutes(t: Trial) -> float:
    """The trial's own ``train.max_minutes`` (0 = no per-run limit)."""
    return float((t.summary.config_value("train.max_minutes") if t.summary is not None else 0) or 0)


def ranks(values: Sequence[float]) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's rho."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        same = x == v
        r[same] = r[same].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation, None when either side is constant or too short."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def correlation_ratio(groups: Sequence[str], y: Sequence[float]) -> Optional[float]:
    """Eta: share of y's spread explained by a categorical (0..1, no sign)."""
    y = np.asarray(y, dtype=float)
    if len(y) < 3 or y.std() == 0:
        return None
    total = ((y - y.mean()) ** 2).sum()
    between = sum(len(y[[g == k for g in groups]]) * (y[[g == k for g in groups]].mean() - y.mean()) ** 2
                  for k in set(groups))
    return float(math.sqrt(between / total))


def is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def correlations(data: SweepData) -> List[Dict[str, Any]]:
    """Per hyperparameter: association with val accuracy and val loss, plus fANOVA importance."""
    rows = [r for r in data.trained if r.val_loss is not None]
    importance, importance_note = param_importance(data)
    out = []
    for name in data.param_names:
        have = [r for r in rows if name in r.params]
        values = [r.params[name] for r in have]
        acc = [r.val_accuracy for r in have]
        loss = [r.val_loss for r in have]
        levels = sorted({str(v) for v in values})
        if is_numeric(values) and len(levels) > 2:
            kind = "spearman"
            with_acc, with_loss = spearman(values, acc), spearman(values, loss)
        elif len(levels) == 2:  # two levels: signed, "rises when the 2nd level is used"
            kind = f"spearman ({levels[0]}=0, {levels[1]}=1)"
            codes = [float(str(v) == levels[1]) for v in values]
            with_acc, with_loss = spearman(codes, acc), spearman(codes, loss)
        else:
            kind = "eta (no sign)"
            with_acc = correlation_ratio([str(v) for v in values], acc)
            with_loss = correlation_ratio([str(v) for v in values], loss)
        out.append({"param": name, "kind": kind, "n": len(have), "val_accuracy": with_acc, "val_loss": with_loss,
                    "importance": importance.get(name)})
    if importance_note:
        for row in out:
            row["importance_note"] = importance_note
    return out


def param_importance(data: SweepData) -> tuple[Dict[str, float], Optional[str]]:
    """fANOVA importance (``optuna.importance.get_param_importances``) on the study, else on a
    study rebuilt from the folders; importances are shares that sum to 1."""
    import optuna

    from inat.sweep.fanova import FanovaEvaluator  # Optuna's fANOVA module, like optuna above

    study = data.study
    note = "fANOVA"
    try:
        if study is None:
            study = study_from_folders(data)
            note += " on a study rebuilt from trial folders (" + (data.study_error or "no storage") + ")"
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < 2:
            return {}, "fewer than 2 complete trials: no importance"
        if len({t.value for t in complete}) == 1:  # fANOVA's forest has no variance to share out
            return {}, f"all {len(complete)} complete trials have the same val accuracy: no importance"
        found = optuna.importance.get_param_importances(study, evaluator=FanovaEvaluator(seed=0))
        return {k: float(v) for k, v in found.items()}, note
    except Exception as err:  # noqa: BLE001 - importance is a bonus (it needs scikit-learn)
        return {}, f"Optuna importance unavailable: {type(err).__name__}: {err}"


def study_from_folders(data: SweepData) -> Any:
    """An in-memory study holding the complete trials read from the folders."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = data.info.get("params") or {}
    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in space.items()])
    study = optuna.create_study(direction="maximize")
    for r in data.rows:
        if r.state != "complete" or r.val_accuracy is None:
            continue
        params = {k: v for k, v in r.params.items() if k in distributions}
        dists = {k: distributions[k] for k in params}
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r.val_accuracy))
        except ValueError:  # a value outside the recorded space (e.g. a pinned key): skip the trial
            continue
    return study


def best_row(data: SweepData) -> Optional[Row]:
    """The complete trial with the highest validation accuracy (pruned ones trained less)."""
    complete = [r for r in data.trained if r.state == "complete"]
    return max(complete or data.trained, key=lambda r: r.val_accuracy, default=None)


def reproduce_command(data: SweepData, row: Row) -> str:
    """A single-run command that retrains the trial (sweep-only keys dropped)."""
    skip = ("wandb.group", "hydra.", "sweep.")
    parts = [f"{k}={v}" for k, v in data.fixed.items() if not k.startswith(skip)]
    parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in row.params.items()]
    return "python run.py " + " ".join(parts)
