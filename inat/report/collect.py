"""Read run folders and sweep (multirun) folders into plain records for the report.

Nothing here imports the training code: the report reads only the files those write, through
:mod:`inat.run_folder` (``summary.json``, ``metrics.csv``, ``.hydra/*.yaml``, ``test/test.json``,
``info.json``, ``explain/explain.json``, a sweep's ``sweep_report.json``, ``multirun.yaml``,
``trials.csv`` and PNGs), so it works on folders copied from another machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from inat import run_folder
from inat.errors import InatError
from inat.run_folder import RunRecord, Summary


@dataclass
class Run:
    """One training run folder (or compact sweep trial), as far as its files tell."""

    record: RunRecord
    sweep: Optional[str] = None  # the sweep folder's name for trials

    @property
    def path(self) -> Path:
        return self.record.path

    @property
    def summary(self) -> Summary:
        """The run's summary; an unfinished run reads as an empty one that says "running"."""
        return self.record.summary or Summary(stop_reason="running")

    @property
    def config(self) -> Dict[str, Any]:
        return self.record.config

    @property
    def overrides(self) -> List[str]:
        return self.record.overrides

    @property
    def metrics(self) -> List[Dict[str, Any]]:
        return [m.to_dict() for m in self.record.metrics]

    @property
    def test(self) -> Optional[Dict[str, Any]]:
        return self.record.test

    @property
    def info(self) -> Optional[Dict[str, Any]]:
        return self.record.info

    @property
    def explain_dir(self) -> Optional[Path]:
        return self.record.explain_dir

    @property
    def name(self) -> str:
        return f"{self.sweep}/{self.path.name}" if self.sweep else self.path.name

    @property
    def trained(self) -> bool:
        """False for a trial the sweep budget refused: it has no model, accuracy or time of its own."""
        return self.record.trained or (self.record.summary is None and bool(self.record.metrics))

    @property
    def model(self) -> str:
        return str(self.get("model.name") or self.summary.model or "?")

    @property
    def is_scratch(self) -> bool:
        return self.model == "scratch"

    @property
    def val(self) -> Optional[float]:
        v = self.summary.best_val_accuracy if self.trained else None
        return float(v) if v is not None else None

    @property
    def test_accuracy(self) -> Optional[float]:
        return float(self.test["accuracy"]) if self.test and self.test.get("accuracy") is not None else None

    @property
    def dataset(self) -> str:
        """Where the run's images came from: its ``data.manifest``, else its ``data.root``."""
        return str(self.get("data.manifest") or self.get("data.root", "?"))

    @property
    def best_ckpt(self) -> Optional[Path]:
        p = self.path / run_folder.BEST
        return p if p.is_file() else None

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``finetune.strategy``), or ``default``."""
        return run_folder.dotted_get(self.config, dotted, default)


@dataclass
class Sweep:
    """A Hydra multirun folder: its trials plus whatever the sweep report left there."""

    path: Path
    runs: List[Run]
    report: Dict[str, Any] = field(default_factory=dict)  # sweep_report.json
    pngs: List[Path] = field(default_factory=list)
    space: Dict[str, Any] = field(default_factory=dict)  # searched parameters
    command: str = ""


def _space_from_multirun(cfg: Any) -> Tuple[Dict[str, Any], str]:
    """Searched parameters and the command from Hydra's multirun.yaml."""
    if not isinstance(cfg, dict):
        return {}, ""
    hydra = cfg.get("hydra", {}) or {}
    sweeper = hydra.get("sweeper", {}) or {}
    space = sweeper.get("params") or {}
    task = (hydra.get("overrides", {}) or {}).get("task") or []
    return dict(space), "python run.py -m " + " ".join(str(t) for t in task)


def load_run(path: Path, sweep: Optional[str] = None) -> Run:
    """One run folder, read by :func:`inat.run_folder.read_run`."""
    return Run(run_folder.read_run(path), sweep)


def sweep_for_report(path: Path) -> Sweep:
    """A sweep folder, read by :func:`inat.run_folder.read_sweep`: trials, report, PNGs, searched space."""
    record = run_folder.read_sweep(Path(path), strict=True)
    runs = [Run(r, sweep=record.path.name) for r in record.trials.values() if r.summary is not None or r.metrics]
    space, command = _space_from_multirun(record.multirun)
    for source in (record.report, record.info):  # sweep.json: written by the sweep when it starts
        for key in ("space", "search_space", "params"):
            if not space and isinstance(source.get(key), dict):
                space = source[key]
    return Sweep(record.path, runs, record.report, record.pngs, space, command or str(record.report.get("command", "")))


def detect_summary(path: Path) -> Optional[Dict[str, Any]]:
    """The detect.json of a detect output folder (it counts detections, not accuracy), else None.

    A folder written before detect had its own file name holds the same object as a
    ``summary.json`` with ``detections_per_class`` (the committed ``experiments/detect``); it
    is read too, and only when that key is there, so a training run's summary never is.
    """
    for name in (run_folder.DETECT, run_folder.SUMMARY):
        try:
            data = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "detections_per_class" in data:
            return data
    return None


def collect(inputs: List[str]) -> Tuple[List[Run], List[Sweep], List[Dict[str, Any]]]:
    """Every input as a run, a sweep or a detect result; anything else is refused naming the path."""
    if not inputs:
        raise InatError("report.inputs is empty: pass run or sweep folders, e.g. report.inputs=[outputs/train/<run>].")
    runs: List[Run] = []
    sweeps: List[Sweep] = []
    detections: List[Dict[str, Any]] = []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            raise InatError(f"Report input '{item}' is not a folder (expected a run folder or a sweep folder).")
        detected = detect_summary(path)
        if detected is not None:
            detections.append({"name": path.name, "path": str(path), "summary": detected})
        elif run_folder.is_run(path):
            runs.append(load_run(path))
        elif run_folder.is_sweep(path):
            sweep = sweep_for_report(path)
            sweeps.append(sweep)
            runs.extend(sweep.runs)
        else:
            raise InatError(f"Report input '{item}' is neither a run folder (summary.json, metrics.csv, checkpoints/), "
                            f"a sweep folder (multirun.yaml, sweep.json, sweep_report.json, trials.csv, numbered "
                            f"trials) nor a detect folder ({run_folder.DETECT}).")
    return runs, sweeps, detections


def best_run(runs: List[Run], scratch: Optional[bool] = True) -> Optional[Run]:
    """The run with the highest best validation accuracy (the test set never picks a model)."""
    pool = [r for r in runs if r.trained and r.val is not None and (scratch is None or r.is_scratch == scratch)]
    return max(pool, key=lambda r: r.val) if pool else None
