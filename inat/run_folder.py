"""The run folder and the sweep folder: every file name, the typed summary, and their readers.

One module owns the on-disk contract so writers and readers cannot drift apart: ``fit``
and the sweep's budget marker both write a :class:`Summary` with :func:`write_summary`;
the report, the sweep report, pruning, proxy promotion and ``experiments/sweep/savings.py``
read folders with :func:`read_run` and :func:`read_sweep`. A sweep folder whose raw trial
folders are gone (``experiments/`` keeps only the compact ``trials.csv``) reads the same way
from that file, so everything computed from a sweep can be recomputed from the evidence
that is committed.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml  # PyYAML comes with OmegaConf; plain safe_load keeps "${...}" strings as written

from inat.errors import InatError
from inat.runs import write_json
from inat.runs import write_metrics as _write_rows

# --- a run folder ------------------------------------------------------------------------
SUMMARY = "summary.json"  # written last: a folder without it is an unfinished run
METRICS = "metrics.csv"  # one MetricsRow per epoch, rewritten every epoch
SPLIT = "split.json"  # the split manifest (which file went to train / val)
CHECKPOINTS = "checkpoints"
BEST = "checkpoints/best.pt"
LAST = "checkpoints/last.pt"
TEST = "test.json"  # +mode=test writes <run>/test/test.json; an older layout kept it at <run>/test.json
TEST_DIR = "test"
RELIABILITY = "reliability.png"  # beside test.json: the test set's reliability diagram
INFO = "info.json"
EXPLAIN_DIR = "explain"
EXPLAIN_FILE = "explain.json"  # what +mode=explain writes into its output folder, beside the figures it names
EXPLAIN = f"{EXPLAIN_DIR}/{EXPLAIN_FILE}"

# --- the output folders of the other commands ----------------------------------------------
# detect's summary has its own name: a summary.json there made is_run take a detect folder for a training run.
DETECT = "detect.json"
GRADCAM = "gradcam.png"  # explain's Grad-CAM grid, beside explain.json; the report shows it
LR_FIND = "lr_find.json"
AUDIT = "audit.json"
DOWNLOAD = "download.json"
HYDRA_HYDRA = ".hydra/hydra.yaml"
DETECT_EVENTS = "events.jsonl"
PREDICTIONS = "predictions.jsonl"
EXPORT = "export.json"
RUNS_CSV = "runs.csv"  # +mode=runs: the table of runs
HYDRA_CONFIG = ".hydra/config.yaml"
HYDRA_OVERRIDES = ".hydra/overrides.yaml"

# --- a sweep folder ----------------------------------------------------------------------
SWEEP_INFO = "sweep.json"  # written by the sweeper at launch: storage, study, params, budget
SWEEP_REPORT = "sweep_report.json"
SWEEP_REPORT_HTML = "sweep_report.html"
SWEEP_PROGRESS_PNG = "sweep_progress.png"
SWEEP_PARALLEL_PNG = "sweep_parallel.png"
MULTIRUN = "multirun.yaml"
OPTIMIZATION_RESULTS = "optimization_results.yaml"
PROMOTION = "promotion.json"
SAVINGS = "savings.json"
TRIALS_CSV = "trials.csv"  # the compact per-trial table that stands in for raw trial folders
OPTUNA_DB = "optuna.db"

# A stop reason that starts with this marks a trial the sweep budget refused (never trained);
# train.py's own per-run time limit writes plain "budget", without the colon.
BUDGET_PREFIX = "budget:"


@dataclass
class Summary:
    """``summary.json``: what a finished run (or a refused sweep trial) reports about itself.

    Field for field what ``fit`` writes at its end. A budget marker fills only the accuracy,
    epoch and time fields and leaves the rest at their defaults. Keys an older or newer
    writer added that are not fields here are kept in ``extra`` and written back unchanged.
    """

    best_val_accuracy: Optional[float] = None
    val_accuracy: Optional[float] = None
    best_epoch: int = 0
    epochs: int = 0
    steps: Optional[int] = None  # optimizer steps (the training/ loop records them)
    stop_reason: str = "epochs"
    train_images_per_sec: Optional[float] = None  # mean over the epochs, the first included
    first_epoch_images_per_sec: Optional[float] = None  # cuDNN autotuning, compilation, cold caches
    steady_images_per_sec: Optional[float] = None  # mean over the epochs after the first
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    cache_seconds: float = 0.0
    params: Optional[int] = None
    trainable_params: Optional[int] = None
    model: Optional[str] = None
    classes: List[str] = field(default_factory=list)
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    device: Optional[str] = None
    world_size: int = 1
    environment: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    precision: Optional[str] = None
    precision_reason: Optional[str] = None
    input: Optional[str] = None  # the JSON key fit writes: which input path fed training (images, cache, ...)
    resize: Optional[str] = None  # progressive resizing: '64->96px' or 'off' (train.resize_start)
    resize_reason: Optional[str] = None
    # the training split's balance (data/balance.imbalance): images per class, max/min, over the threshold
    class_counts: Optional[List[int]] = None
    imbalance_ratio: Optional[float] = None
    imbalanced: Optional[bool] = None
    # temperature scaling fitted on the validation split (None: the raw softmax is kept, note says why)
    temperature: Optional[float] = None
    temperature_note: Optional[str] = None
    # the rejection threshold chosen on the validation split (None: none reached the target; see rejection)
    reject_threshold: Optional[float] = None
    rejection: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def budget_stopped(self) -> bool:
        """True for a trial the sweep budget refused: it never trained, its zeros are not results."""
        return str(self.stop_reason).startswith(BUDGET_PREFIX)

    @property
    def pruned(self) -> bool:
        return str(self.stop_reason).startswith("pruned")

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object, ``extra`` merged in; unset optional keys of newer writers are left out."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("steps", "precision", "precision_reason", "input", "resize", "resize_reason",
                    "first_epoch_images_per_sec",
                    "steady_images_per_sec", "class_counts", "imbalance_ratio", "imbalanced", "temperature_note",
                    "rejection"):
            if out[key] is None:
                del out[key]
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Summary":
        """Parse a ``summary.json`` object; unknown keys go to ``extra``, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def config_value(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved config by dotted key (``train.epochs``), or ``default``."""
        return dotted_get(self.config, dotted, default)


@dataclass
class MetricsRow:
    """One row of ``metrics.csv`` (one epoch). A compact ``trials.csv`` keeps only the val columns."""

    epoch: int
    val_accuracy: float
    val_loss: Optional[float] = None
    train_loss: Optional[float] = None
    train_accuracy: Optional[float] = None
    lr: Optional[float] = None
    images_per_sec: Optional[float] = None
    seconds: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        """The CSV row in the column order ``fit`` writes (unset columns left out)."""
        order = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_sec", "seconds")
        return {k: getattr(self, k) for k in order if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "MetricsRow":
        """Parse one CSV row (strings or numbers); empty cells become None."""
        def num(key: str) -> Optional[float]:
            v = row.get(key)
            return None if v in (None, "") else float(v)

        return cls(int(float(row["epoch"])), float(row["val_accuracy"]), num("val_loss"), num("train_loss"),
                   num("train_accuracy"), num("lr"), num("images_per_sec"), num("seconds"))


@dataclass
class RunRecord:
    """Everything a run folder (or one row of a compact ``trials.csv``) says about a run."""

    path: Path
    summary: Optional[Summary]  # None: unfinished (no summary.json yet)
    metrics: List[MetricsRow] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    test: Optional[Dict[str, Any]] = None
    info: Optional[Dict[str, Any]] = None
    explain_dir: Optional[Path] = None
    started: Optional[dt.datetime] = None  # a compact trial's recorded start (raw folders: the study's)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def trained(self) -> bool:
        """A run that trained at least once (a budget marker did not)."""
        return self.summary is not None and not self.summary.budget_stopped


@dataclass
class SweepRecord:
    """A sweep folder: its trials (numbered folders, else ``trials.csv``) and the files beside them."""

    path: Path
    trials: Dict[int, RunRecord]
    info: Dict[str, Any] = field(default_factory=dict)  # sweep.json
    report: Dict[str, Any] = field(default_factory=dict)  # sweep_report.json
    multirun: Any = None  # Hydra's multirun.yaml (basic sweeper), as a container
    pngs: List[Path] = field(default_factory=list)
    compact: bool = False  # True when the trials came from trials.csv


def dotted_get(node: Any, dotted: str, default: Any = None) -> Any:
    """``node["a"]["b"]`` for ``"a.b"``, or ``default`` when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def write_summary(run_dir: Path, summary: Summary) -> Path:
    """Write ``summary.json`` atomically (the last file a run writes); returns its path."""
    path = Path(run_dir) / SUMMARY
    write_json(path, summary.to_dict())
    return path


def write_metrics(run_dir: Path, rows: Sequence[Union[MetricsRow, Mapping[str, Any]]]) -> None:
    """Rewrite ``metrics.csv`` from the full history (typed rows or the dicts ``fit`` keeps)."""
    _write_rows(Path(run_dir) / METRICS, [r.to_dict() if isinstance(r, MetricsRow) else dict(r) for r in rows])


def _json(path: Path, strict: bool) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        if strict:
            raise InatError(f"'{path}' is not valid JSON ({err}).") from err
        return None  # a file being written right now by another worker


def _yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text())


def read_summary(run_dir: Path, strict: bool = False) -> Optional[Summary]:
    """The run's ``Summary``; None while it has none (or, unless ``strict``, a half-written one)."""
    data = _json(Path(run_dir) / SUMMARY, strict)
    return Summary.from_dict(data) if isinstance(data, dict) else None


def read_metrics(run_dir: Path) -> List[MetricsRow]:
    """``metrics.csv`` as typed rows ([] when missing or half-written)."""
    try:
        with open(Path(run_dir) / METRICS, newline="") as f:
            return [MetricsRow.from_dict(row) for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_overrides(run_dir: Path) -> List[str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``) as written."""
    return [str(o) for o in (_yaml(Path(run_dir) / HYDRA_OVERRIDES) or [])]


def overrides_dict(overrides: Iterable[str]) -> Dict[str, str]:
    """``["+a=1", "b=x"]`` as ``{"a": "1", "b": "x"}`` (Hydra's ``+``/``~`` prefixes dropped)."""
    out: Dict[str, str] = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def find_test(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's test result: ``<run>/test/test.json``, else ``<run>/test.json``."""
    for candidate in (Path(run_dir) / TEST_DIR / TEST, Path(run_dir) / TEST):
        data = _json(candidate, strict=True)
        if data is not None:
            return data
    return None


def is_run(path: Path) -> bool:
    """A run folder has a summary, a metrics file or checkpoints."""
    return any((Path(path) / p).exists() for p in (SUMMARY, METRICS, BEST))


def is_sweep(path: Path) -> bool:
    """A sweep folder has multirun.yaml, sweep.json, a sweep report, trials.csv or numbered runs."""
    path = Path(path)
    if any((path / p).is_file() for p in (MULTIRUN, SWEEP_INFO, SWEEP_REPORT, TRIALS_CSV)):
        return True
    return any(p.is_dir() and p.name.isdigit() and is_run(p) for p in path.iterdir())


def read_run(run_dir: Path, strict: bool = True) -> RunRecord:
    """Read one run folder. The config is the summary's, else Hydra's ``.hydra/config.yaml``.

    ``strict=False`` is for folders other processes are writing (a running sweep): a
    half-written summary reads as "not finished" instead of raising.
    """
    run_dir = Path(run_dir)
    summary = read_summary(run_dir, strict)
    config = (summary.config if summary is not None else None) or _yaml(run_dir / HYDRA_CONFIG) or {}
    explain_dir = run_dir / EXPLAIN_DIR if (run_dir / EXPLAIN).is_file() else None
    return RunRecord(run_dir, summary, read_metrics(run_dir), read_overrides(run_dir), config,
                     find_test(run_dir) if strict else None, _json(run_dir / INFO, strict), explain_dir)


# --- the compact trials.csv --------------------------------------------------------------
TRIALS_COLUMNS = ("number", "started", "stop_reason", "model", "epochs", "planned_epochs", "max_minutes",
                  "best_val_accuracy", "train_seconds", "overrides", "val_accuracy_curve", "val_loss_curve")


def _curve(values: Iterable[Optional[float]]) -> str:
    return ";".join("" if v is None else repr(float(v)) for v in values)  # repr: exact round trip


def trial_row(number: int, record: RunRecord, started: Optional[dt.datetime]) -> Dict[str, Any]:
    """One ``trials.csv`` row: what the sweep analyses need from a trial folder, and no more."""
    s = record.summary or Summary(stop_reason="running")
    return {"number": number, "started": started.isoformat() if started else "", "stop_reason": s.stop_reason,
            "model": s.model or dotted_get(record.config, "model.name", ""), "epochs": s.epochs or len(record.metrics),
            "planned_epochs": dotted_get(record.config, "train.epochs", ""),
            "max_minutes": dotted_get(record.config, "train.max_minutes", ""),
            "best_val_accuracy": "" if s.best_val_accuracy is None else repr(float(s.best_val_accuracy)),
            "train_seconds": s.train_seconds, "overrides": " ".join(record.overrides),
            "val_accuracy_curve": _curve(m.val_accuracy for m in record.metrics),
            "val_loss_curve": _curve(m.val_loss for m in record.metrics)}


def write_trials_csv(sweep_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``trials.csv`` (rows from :func:`trial_row`) in trial-number order."""
    path = Path(sweep_dir) / TRIALS_CSV
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(TRIALS_COLUMNS))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: int(r["number"])))
    return path


def _record_from_row(sweep_dir: Path, row: Mapping[str, str]) -> RunRecord:
    """A ``RunRecord`` rebuilt from one ``trials.csv`` row (val curves only, no checkpoints)."""
    def floats(text: str) -> List[Optional[float]]:
        return [float(v) if v else None for v in text.split(";")] if text else []

    acc, loss = floats(row["val_accuracy_curve"]), floats(row["val_loss_curve"])
    metrics = [MetricsRow(i + 1, a, loss[i] if i < len(loss) else None) for i, a in enumerate(acc) if a is not None]
    config: Dict[str, Any] = {"model": {"name": row["model"]} if row["model"] else {}, "train": {}}
    for key in ("planned_epochs", "max_minutes"):
        if row[key]:
            config["train"]["epochs" if key == "planned_epochs" else key] = float(row[key])
    if "epochs" in config["train"]:
        config["train"]["epochs"] = int(config["train"]["epochs"])
    summary = None
    if row["stop_reason"] != "running":
        best = float(row["best_val_accuracy"]) if row["best_val_accuracy"] else None
        summary = Summary(best_val_accuracy=best, epochs=int(row["epochs"] or 0), stop_reason=row["stop_reason"],
                          train_seconds=float(row["train_seconds"] or 0), model=row["model"] or None, config=config)
    started = dt.datetime.fromisoformat(row["started"]) if row["started"] else None
    return RunRecord(sweep_dir / row["number"], summary, metrics, row["overrides"].split(), config, started=started)


def read_trials_csv(sweep_dir: Path) -> Dict[int, RunRecord]:
    """The trials of a compact ``trials.csv`` by number."""
    with open(Path(sweep_dir) / TRIALS_CSV, newline="") as f:
        return {int(row["number"]): _record_from_row(Path(sweep_dir), row) for row in csv.DictReader(f)}


def read_sweep_info(sweep_dir: Path) -> Dict[str, Any]:
    """``sweep.json`` (what the sweeper recorded at launch), {} when there is none."""
    return _json(Path(sweep_dir) / SWEEP_INFO, strict=True) or {}


def read_sweep(sweep_dir: Path, strict: bool = False) -> SweepRecord:
    """Read a sweep folder: numbered trial folders (else ``trials.csv``), sweep.json, the report, PNGs."""
    sweep_dir = Path(sweep_dir)
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()] if sweep_dir.is_dir() else []
    trials = {int(p.name): read_run(p, strict) for p in dirs}
    compact = not trials and (sweep_dir / TRIALS_CSV).is_file()
    if compact:
        trials = read_trials_csv(sweep_dir)
    return SweepRecord(sweep_dir, dict(sorted(trials.items())), _json(sweep_dir / SWEEP_INFO, strict) or {},
                       _json(sweep_dir / SWEEP_REPORT, strict) or {}, _yaml(sweep_dir / MULTIRUN),
                       sorted(sweep_dir.glob("*.png")) if sweep_dir.is_dir() else [], compact)
