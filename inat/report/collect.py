"""Read run folders and sweep (multirun) folders into plain records for the report.

Nothing here imports the training or sweep code: the report reads only the files those
write (``summary.json``, ``metrics.csv``, ``.hydra/*.yaml``, ``test/test.json``,
``info.json``, ``explain/explain.json``, a sweep's ``sweep_report.json``, ``multirun.yaml``
and PNGs), so it works on folders copied from another machine.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from inat.errors import InatError


@dataclass
class Run:
    """One training run folder, as far as its files tell."""

    path: Path
    summary: Dict[str, Any]
    config: Dict[str, Any]
    overrides: List[str]
    metrics: List[Dict[str, Any]]
    test: Optional[Dict[str, Any]] = None
    info: Optional[Dict[str, Any]] = None
    explain_dir: Optional[Path] = None  # a folder holding explain.json and its PNGs
    sweep: Optional[str] = None  # the sweep folder's name for trials

    @property
    def name(self) -> str:
        return f"{self.sweep}/{self.path.name}" if self.sweep else self.path.name

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name") or self.summary.get("model") or "?")

    @property
    def is_scratch(self) -> bool:
        return self.model == "scratch"

    @property
    def val(self) -> Optional[float]:
        v = self.summary.get("best_val_accuracy")
        return float(v) if v is not None else None

    @property
    def test_accuracy(self) -> Optional[float]:
        return float(self.test["accuracy"]) if self.test and self.test.get("accuracy") is not None else None

    @property
    def best_ckpt(self) -> Optional[Path]:
        p = self.path / "checkpoints" / "best.pt"
        return p if p.is_file() else None

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``finetune.strategy``), or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


@dataclass
class Sweep:
    """A Hydra multirun folder: its trials plus whatever the sweep report left there."""

    path: Path
    runs: List[Run]
    report: Dict[str, Any] = field(default_factory=dict)  # sweep_report.json
    pngs: List[Path] = field(default_factory=list)
    space: Dict[str, Any] = field(default_factory=dict)  # searched parameters
    command: str = ""


def _json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InatError(f"'{path}' is not valid JSON ({err}).") from err


def _yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _metrics(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(text: str) -> Any:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except (TypeError, ValueError):
        return text


def is_run(path: Path) -> bool:
    """A run folder has a summary, a metrics file or checkpoints."""
    return any((path / p).exists() for p in ("summary.json", "metrics.csv", "checkpoints/best.pt"))


def is_sweep(path: Path) -> bool:
    """A sweep folder has Hydra's multirun.yaml, a sweep report, or numbered run folders."""
    if (path / "multirun.yaml").is_file() or (path / "sweep_report.json").is_file():
        return True
    return any(p.is_dir() and p.name.isdigit() and is_run(p) for p in path.iterdir())


def find_test(path: Path) -> Optional[Dict[str, Any]]:
    """test.json of a run: ``<run>/test/test.json`` (written after training) or ``<run>/test.json``."""
    for candidate in (path / "test" / "test.json", path / "test.json"):
        data = _json(candidate)
        if data is not None:
            return data
    return None


def load_run(path: Path, sweep: Optional[str] = None) -> Run:
    """Read one run folder; the config comes from summary.json, else ``.hydra/config.yaml``."""
    path = Path(path)
    summary = _json(path / "summary.json") or {}
    config = summary.get("config") or _yaml(path / ".hydra" / "config.yaml") or {}
    overrides = _yaml(path / ".hydra" / "overrides.yaml") or []
    explain_dir = path / "explain" if (path / "explain" / "explain.json").is_file() else None
    return Run(path, summary, config, [str(o) for o in overrides], _metrics(path / "metrics.csv"), find_test(path),
               _json(path / "info.json"), explain_dir, sweep)


def _space_from_multirun(cfg: Any) -> Tuple[Dict[str, Any], str]:
    """Searched parameters and the command from Hydra's multirun.yaml."""
    if not isinstance(cfg, dict):
        return {}, ""
    hydra = cfg.get("hydra", {}) or {}
    sweeper = hydra.get("sweeper", {}) or {}
    space = sweeper.get("params") or {}
    task = (hydra.get("overrides", {}) or {}).get("task") or []
    return dict(space), "python run.py -m " + " ".join(str(t) for t in task)


def load_sweep(path: Path) -> Sweep:
    """Read a sweep folder: numbered trial folders, sweep_report.json, PNGs, the searched space."""
    path = Path(path)
    trials = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and is_run(p)), key=lambda p: int(p.name))
    runs = [load_run(p, sweep=path.name) for p in trials]
    report = _json(path / "sweep_report.json") or {}
    space, command = _space_from_multirun(_yaml(path / "multirun.yaml"))
    launch = _json(path / "sweep.json") or {}  # written by the sweep when it starts: storage, study, params
    for source in (report, launch):
        for key in ("space", "search_space", "params"):
            if not space and isinstance(source.get(key), dict):
                space = source[key]
    pngs = sorted(path.glob("*.png"))
    return Sweep(path, runs, report, pngs, space, command or str(report.get("command", "")))


def collect(inputs: List[str]) -> Tuple[List[Run], List[Sweep]]:
    """Every input as a run or a sweep; anything else is refused naming the path."""
    if not inputs:
        raise InatError("report.inputs is empty: pass run or sweep folders, e.g. report.inputs=[outputs/train/<run>].")
    runs: List[Run] = []
    sweeps: List[Sweep] = []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            raise InatError(f"Report input '{item}' is not a folder (expected a run folder or a sweep folder).")
        if is_run(path):
            runs.append(load_run(path))
        elif is_sweep(path):
            sweep = load_sweep(path)
            sweeps.append(sweep)
            runs.extend(sweep.runs)
        else:
            raise InatError(f"Report input '{item}' is neither a run folder (summary.json, metrics.csv, checkpoints/) "
                            f"nor a sweep folder (multirun.yaml, sweep_report.json, numbered trials).")
    return runs, sweeps


def best_run(runs: List[Run], scratch: Optional[bool] = True) -> Optional[Run]:
    """The run with the highest best validation accuracy (the test set never picks a model)."""
    pool = [r for r in runs if r.val is not None and (scratch is None or r.is_scratch == scratch)]
    return max(pool, key=lambda r: r.val) if pool else None
