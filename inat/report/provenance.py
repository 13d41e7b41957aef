"""Where each number came from: command, data root, seeds, versions, hardware.

A run folder records its command (``.hydra/overrides.yaml``), config and device; versions
and hardware come from what the run left (wandb's metadata and requirements files when
present). What the run folder does not record is filled from the machine building the
report and labelled so, never passed off as the run's.
"""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from inat.machine import cpu_features, cpu_model, describe_cpu
from inat.report.collect import Run


def this_machine() -> Dict[str, str]:
    """Versions and hardware of the machine running the report."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": describe_cpu(cpu_model(), os.cpu_count(), torch.backends.cpu.get_cpu_capability(), cpu_features()),
            "gpu": gpu, "os": platform.platform()}


def _wandb_files(run: Run) -> Optional[Path]:
    runs = sorted(run.path.glob("wandb/*run-*/files"))
    return runs[-1] if runs else None


def recorded_environment(run: Run) -> Dict[str, str]:
    """Versions and hardware the run folder itself recorded (may be empty)."""
    env: Dict[str, str] = {}
    # fit records its versions and hardware under summary["environment"] (Summary.environment).
    recorded = run.summary.environment or {}
    for key in ("python", "torch", "cpu", "gpu"):
        if recorded.get(key):
            env[key] = str(recorded[key])
    if "cpu" in env:
        env["cpu"] = describe_cpu(env["cpu"], recorded.get("cpu_count"), recorded.get("cpu_capability"),
                                  recorded.get("cpu_features") or [])
    if recorded and "gpu" not in env:  # the run recorded its machine, and it had no GPU in use
        env["gpu"] = "none"
    files = _wandb_files(run)
    if files is not None:
        meta_path = files / "wandb-metadata.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = {}
            if meta.get("python"):
                env.setdefault("python", str(meta["python"]).split()[0])
            if meta.get("cpu_count"):
                env.setdefault("cpu", f"{meta.get('cpu_count')} CPUs")
            if meta.get("gpu"):
                env.setdefault("gpu", f"{meta.get('gpu_count', 1)} x {meta['gpu']}")
        req = files / "requirements.txt"
        if req.is_file():
            m = re.search(r"^torch==(\S+)$", req.read_text(), flags=re.M)
            if m:
                env.setdefault("torch", m.group(1))
    return env


def run_provenance(run: Run, machine: Dict[str, str]) -> Dict[str, Any]:
    """One row of the provenance table for ``run``."""
    env = recorded_environment(run)
    missing = [k for k in ("python", "torch", "cpu", "gpu") if k not in env]
    for k in missing:  # honest fallback: say it is the report machine's value
        env[k] = f"{machine[k]} (report machine)"
    seeds = {"seed": run.get("seed"), "data.split_seed": run.get("data.split_seed")}
    device = run.summary.device
    if device:
        env["device"] = f"{device} x {run.summary.world_size}"
    if run.summary.precision:
        env["precision"] = run.summary.precision
    # A sweep trial's overrides.yaml holds its sampled values: as a single run they reproduce it.
    command = " ".join(["python run.py", *run.overrides])
    return {"run": run.name, "path": str(run.path), "command": command, "data_root": run.dataset,
            "seeds": seeds, "env": env, "sweep": run.sweep}
