"""The table of runs and the seed groups: every run under a folder, what differs between them, and repeats.

``find_rows(root)`` walks a folder of run folders and sweeps (recursively; symlinked folders are
not followed) and reads each run through :mod:`inat.run_folder` into a :class:`RunRow`: its
flattened config, best validation accuracy, test accuracy, macro-F1 and ECE (from ``test.json``,
when the run was tested), epochs, img/s, precision and hardware (from ``summary.json``). A run
still running (its lock held), stopped (no ``summary.json`` and no live process) or broken
(a file that does not parse) is a row with a status and a short reason, never an exception.

``seed_groups(rows)`` puts together the runs whose configurations are equal in every key but
the repeat keys (``seed`` by default) and gives, per group, mean ± std (n) and a 95% interval
(Student's t) of each metric over the finished runs that have it.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from inat import run_folder
from inat.errors import InatError
from inat.run_folder import RunRecord
from inat.runs import LOCK_NAME, atomic_open, run_lock_holder

# Config sections that belong to other commands or to logging: they never change what a training
# run learns, so they neither show as "differing" nor split a seed group.
# ``hydra`` (hydra.run.dir, ...) appears only among a run's overrides and names its folder.
NOT_TRAINING = ("mode", "explain", "report", "runs", "predict", "export", "detect", "lr_find", "wandb", "resume",
                "hydra")

# The metrics a seed group summarises: column -> what the report calls it.
GROUP_METRICS: Dict[str, str] = {"best_val": "best val accuracy", "test": "test accuracy", "macro_f1": "macro-F1",
                           "ece": "ECE"}
# The table's columns after the differing config keys; these sort descending (best first).
COLUMNS = ("best_val", "test", "macro_f1", "ece", "epochs", "img_s", "precision", "device", "hardware", "group")
DESCENDING = ("best_val", "test", "macro_f1", "img_s")

CONFIDENCE = 0.95  # of the seed groups' t interval
DONE = "done"  # the only status whose numbers enter a seed group


@dataclass
class RunRow:
    """One run of the table: where it is, its state, its flattened config and its numbers."""

    name: str  # the folder relative to the root walked (sweep trials: sweep/number)
    status: str  # done | running | stopped | pruned | not trained | broken
    reason: str = ""
    config: Dict[str, Any] = field(default_factory=dict)  # dotted key -> value (lists as JSON text)
    best_val: Optional[float] = None
    test: Optional[float] = None
    macro_f1: Optional[float] = None
    ece: Optional[float] = None  # of the probabilities the run reports: after temperature scaling when fitted
    epochs: Optional[int] = None
    img_s: Optional[float] = None
    precision: Optional[str] = None
    device: Optional[str] = None
    hardware: Optional[str] = None
    group: str = ""  # the seed group's id (g1, g2, ...) when the run has repeats

    def value(self, key: str) -> Any:
        """A column (``best_val``, ``epochs``, ...) or a dotted config key; None when unknown."""
        return getattr(self, key) if key in COLUMNS else self.config.get(key)


@dataclass
class Spread:
    """mean ± std (n) and the 95% Student-t interval of one metric over a group's runs."""

    mean: float
    std: Optional[float]  # sample std (ddof=1); None for one run
    n: int
    low: Optional[float]
    high: Optional[float]


@dataclass
class Group:
    """Runs equal in every config key but the repeat keys, and the spread of each metric."""

    id: str
    label: str  # the config values that set the group apart from the other groups
    repeats: str  # the repeat keys' values of its runs, e.g. "seed=0, 1, 2"
    rows: List[RunRow]
    spreads: Dict[str, Spread]


@dataclass
class RunsTable:
    rows: List[RunRow]
    keys: List[str]  # the config keys that differ between runs
    groups: List[Group]


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` as ``{"train.lr": 0.1}``; a list (or an empty section) becomes its JSON text."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
    return out


def _training_keys(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in flatten(config).items() if k.split(".")[0] not in NOT_TRAINING}


def _hardware(record: RunRecord) -> Optional[str]:
    """"GPU NVIDIA H200" or "CPU AMD EPYC (2 CPUs)" from what the run recorded in summary.json."""
    s = record.summary
    if s is None or not s.environment:
        return None
    env = s.environment
    if str(s.device or "").startswith("cuda") and env.get("gpu"):
        return f"GPU {env['gpu']}"
    count = f" ({env['cpu_count']} CPUs)" if env.get("cpu_count") else ""
    return f"CPU {env.get('cpu') or '?'}{count}"


def _status(record: RunRecord) -> Tuple[str, str]:
    """The run's state and why, from its files and its lock (a sweep's compact row has no lock)."""
    holder = run_lock_holder(record.path)
    s = record.summary
    if holder is not None:
        done = "summary.json written, test not finished" if s is not None else "no summary.json yet"
        return "running", f"pid {holder}, {len(record.metrics)} epochs so far; {done}"
    if s is None:
        last = (record.path / run_folder.LAST).is_file()
        return "stopped", ("no summary.json and no live process" +
                           ("; checkpoints/last.pt is there (resume=auto continues it)" if last else ""))
    if s.budget_stopped:
        return "not trained", f"refused by the sweep budget ({s.stop_reason})"
    if s.pruned:
        return "pruned", s.stop_reason
    return DONE, ""


def _number(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _override_value(text: str) -> Any:
    """An override's value as the config holds it (YAML 1.1 reads ``1e-3`` as text, Hydra as a float)."""
    value = yaml.safe_load(text) if text else text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def row_from_record(record: RunRecord, name: str) -> RunRow:
    """The table's row for a run already read (``read_run``, a report's run, a compact trial).

    A compact trial (``trials.csv``) keeps only a few config keys; its sampled values come back
    from its overrides (the dotted ones and ``seed``; a resolved config already holds them), so a
    compact sweep still groups by them.
    """
    status, reason = _status(record)
    config = _training_keys(record.config)
    for key, text in run_folder.overrides_dict(record.overrides).items():
        if ("." in key or key == "seed") and key.split(".")[0] not in NOT_TRAINING:
            config.setdefault(key, _override_value(text))
    s, test = record.summary, record.test or {}
    trained = s is not None and not s.budget_stopped
    device = None
    if s is not None and s.device:
        device = s.device if s.world_size <= 1 else f"{s.device} x{s.world_size}"
    return RunRow(name, status, reason, config,
                  best_val=_number(s.best_val_accuracy) if trained else None,
                  test=_number(test.get("accuracy")), macro_f1=_number(test.get("macro_f1")),
                  ece=_number(test.get("ece")), epochs=s.epochs if trained else None,
                  img_s=_number((s.steady_images_per_sec or s.train_images_per_sec) if trained else None),
                  precision=s.precision if s is not None else None, device=device, hardware=_hardware(record))


def read_row(path: Path, name: str) -> Optional[RunRow]:
    """One run folder as a row; a folder of another command (``+mode=report``, detect) is None.

    A file that does not parse makes a ``broken`` row naming it instead of an exception.
    """
    try:
        record = run_folder.read_run(path, strict=True)
    except (InatError, OSError, ValueError, yaml.YAMLError) as err:
        return RunRow(name, "broken", str(err).splitlines()[0] if str(err) else type(err).__name__)
    if not isinstance(record.config, dict) or not isinstance(record.test or {}, dict):
        return RunRow(name, "broken", "its config or test.json is not an object")
    if run_folder.dotted_get(record.config, "mode.name", "train") != "train":
        return None
    try:
        return row_from_record(record, name)
    except (TypeError, ValueError, AttributeError) as err:  # valid JSON, but text where a number goes
        return RunRow(name, "broken", f"summary.json or test.json is not what a run writes ({err})")


def _is_run_folder(path: Path) -> bool:
    """A run folder: a run's files, its lock, or Hydra's record of a command (the mode is read later)."""
    return run_folder.is_run(path) or any((path / p).exists() for p in (LOCK_NAME, run_folder.HYDRA_CONFIG))


def _numbered_runs(path: Path) -> bool:
    return any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


def find_rows(root: Path) -> List[RunRow]:
    """Every run under ``root`` (``root`` itself may be one), as rows named by their path below ``root``.

    A run folder is not searched further (its ``test/`` and ``explain/`` are its own); a sweep
    whose trial folders are gone is read from its ``trials.csv``.
    """
    root = Path(root)
    rows: List[RunRow] = []

    def visit(path: Path) -> None:
        name = path.relative_to(root).as_posix() if path != root else path.name
        if _is_run_folder(path):
            row = read_row(path, name)
            if row is not None:
                rows.append(row)
            return
        if (path / run_folder.TRIALS_CSV).is_file() and not _numbered_runs(path):
            try:
                trials = run_folder.read_trials_csv(path)
            except (OSError, ValueError, KeyError) as err:
                rows.append(RunRow(f"{name}/{run_folder.TRIALS_CSV}", "broken", f"unreadable ({err})"))
                return
            rows.extend(row_from_record(r, f"{name}/{n}") for n, r in trials.items())
            return
        try:
            with os.scandir(path) as entries:
                children = sorted(e.name for e in entries
                                  if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
        except OSError as err:
            rows.append(RunRow(name, "broken", f"cannot list the folder ({err.strerror or err})"))
            return
        for child in children:
            visit(path / child)

    visit(root)
    return rows


def differing_keys(rows: Sequence[RunRow]) -> List[str]:
    """The config keys two runs that both record them set differently, in config order.

    A key only some runs record (an older config, a compact trial) is not a difference by itself.
    """
    seen: Dict[str, set] = {}
    for row in rows:
        for key, value in row.config.items():
            seen.setdefault(key, set()).add(repr(value))
    return [k for k, values in seen.items() if len(values) > 1]


def spread(values: Sequence[float]) -> Spread:
    """mean, sample std, n and the CONFIDENCE (95%) interval ``mean ± t(0.975, n-1) · std / sqrt(n)``."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Spread(mean, None, len(x), None, None)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return Spread(mean, std, len(x), mean - half, mean + half)


def _shown(value: Any) -> str:
    return "–" if value is None else str(value)


def seed_groups(rows: Sequence[RunRow], repeat_keys: Sequence[str] = ("seed",)) -> List[Group]:
    """Groups of two or more runs whose configs differ only in ``repeat_keys``; sets each row's ``group``.

    Any status joins a group (the table shows which runs are repeats); the spreads use the
    finished (``done``) runs that have the metric. Groups are numbered in the rows' order.
    """
    keys = [k for k in differing_keys(rows) if k not in repeat_keys]
    by_config: Dict[Tuple[str, ...], List[RunRow]] = {}
    for row in rows:
        if row.config:  # a broken run, or one that has not recorded its config, is no one's repeat
            by_config.setdefault(tuple(repr(row.config.get(k)) for k in keys), []).append(row)
    groups = []
    for members in by_config.values():
        if len(members) < 2:
            continue
        gid = f"g{len(groups) + 1}"
        for row in members:
            row.group = gid
        label = " ".join(f"{k}={_shown(members[0].config.get(k))}" for k in keys) or "one config"
        repeats = "; ".join(f"{k}={', '.join(_shown(r.config.get(k)) for r in members)}" for k in repeat_keys)
        done = [r for r in members if r.status == DONE]
        spreads = {m: spread([getattr(r, m) for r in done if getattr(r, m) is not None]) for m in GROUP_METRICS
                   if any(getattr(r, m) is not None for r in done)}
        groups.append(Group(gid, label, repeats, members, spreads))
    return groups


def sort_rows(rows: Sequence[RunRow], key: str) -> List[RunRow]:
    """Rows by ``key`` (a column or a config key): accuracies and img/s descending, the rest ascending.

    Runs without a value come last, in their found order.
    """
    if key not in COLUMNS and key != "run" and not any(key in r.config for r in rows):
        raise InatError(f"runs.sort={key} is neither a column ({', '.join(('run',) + COLUMNS)}) nor a config key "
                        f"of these runs (e.g. {', '.join(differing_keys(rows)[:3]) or 'train.lr'}).")
    sign = -1 if key in DESCENDING else 1

    def order(row: RunRow) -> Tuple:
        value = row.name if key == "run" else row.value(key)
        if value is None:
            return (2, 0)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, sign * float(value))
        return (1, str(value))

    return sorted(rows, key=order)


def build_table(root: Path, sort: str = "best_val", repeat_keys: Sequence[str] = ("seed",)) -> RunsTable:
    """Every run under ``root``, the keys that differ, the seed groups, sorted by ``sort``."""
    root = Path(root)
    if not root.is_dir():
        raise InatError(f"runs.root '{root}' is not a folder: name a folder of run folders and sweeps, "
                        f"e.g. runs.root=outputs.")
    rows = find_rows(root)
    if not rows:
        raise InatError(f"No run folders under '{root}' (a run folder holds {run_folder.SUMMARY}, "
                        f"{run_folder.METRICS} or {run_folder.CHECKPOINTS}/; a compact sweep {run_folder.TRIALS_CSV}).")
    groups = seed_groups(rows, repeat_keys)
    return RunsTable(sort_rows(rows, sort), differing_keys(rows), groups)


# --- the table as text and as CSV ---------------------------------------------------------
def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if key in GROUP_METRICS:
        return f"{100 * value:.1f}%"
    if key == "img_s":
        return f"{value:,.0f}"
    if isinstance(value, float):  # a sampled lr is 0.0004303617943639812 in the config; the CSV keeps it so
        return f"{value:.4g}"
    return str(value)


def table_records(table: RunsTable) -> List[Dict[str, Any]]:
    """One dict per row in column order: run, status, the differing keys, the numbers, the reason (raw values)."""
    return [{"run": r.name, "status": r.status, **{k: r.config.get(k) for k in table.keys},
             **{c: getattr(r, c) for c in COLUMNS}, "reason": r.reason} for r in table.rows]


def format_table(table: RunsTable) -> str:
    """The terminal table (accuracies as percentages), then one line per seed group."""
    records = table_records(table)
    headers = list(records[0])
    cells = [[_cell(h, rec[h]) for h in headers] for rec in records]
    numeric = set(GROUP_METRICS) | {"epochs", "img_s"}
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values: Iterable[str]) -> str:
        return "  ".join(v.rjust(w) if h in numeric else v.ljust(w)
                         for h, v, w in zip(headers, values, widths)).rstrip()

    out = [line(headers), line("-" * w for w in widths), *(line(row) for row in cells)]
    if table.groups:
        out.append("")
        out.append("seed groups (mean ± std (n) [95% t interval] over finished runs):")
        for g in table.groups:
            out.append(f"{g.id} {g.label} ({g.repeats}): " + ("; ".join(
                f"{GROUP_METRICS[m]} {format_spread(s)}" for m, s in g.spreads.items()) or "no finished run yet"))
    return "\n".join(out)


def format_spread(s: Spread, scale: float = 100.0, unit: str = "%") -> str:
    """"57.7 ± 0.8% (n=3) [55.6, 59.8]"; one run: "57.7% (n=1)"."""
    if s.std is None:
        return f"{scale * s.mean:.1f}{unit} (n={s.n})"
    return (f"{scale * s.mean:.1f} ± {scale * s.std:.1f}{unit} (n={s.n}) "
            f"[{scale * s.low:.1f}, {scale * s.high:.1f}]")


def write_csv(table: RunsTable, path: Path) -> Path:
    """The table as CSV (accuracies as fractions, as summary.json and test.json hold them), atomically."""
    records = table_records(table)
    with atomic_open(Path(path), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return Path(path)
