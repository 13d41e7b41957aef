"""The run writer: checkpoints, metrics.csv, wandb and the console, on rank 0 only.

Order matters for a run killed at any instant: ``best.pt`` is written before ``last.pt``, so
a resumed run (which starts from ``last.pt``) never finds a best model older than the epoch
it resumes after; ``summary.json`` is written last, so a folder without it is unfinished.
A run stopped by a signal mid-epoch writes ``last.pt`` alone (no epoch ended, so no best).

A resumed run logs to the same wandb run: the id wandb gave the first start travels in every
checkpoint (``wandb_id``), and the resumed start passes it back with ``resume="allow"``,
offline too, so the run's history continues at the next epoch instead of starting a second run.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from inat.checkpoint import save_epoch_checkpoints
from inat.errors import EXIT_RESUMABLE
from inat.machine import cpu_features, cpu_model
from inat.run_folder import CHECKPOINTS, METRICS, Summary, write_summary
from inat.runs import write_metrics


def environment(device: torch.device) -> Dict[str, Any]:
    """Versions and hardware behind a run's numbers (for the report's provenance block)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_features": cpu_features(), "threads": torch.get_num_threads(),
            "host": platform.node(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def rng_state(device: torch.device) -> Dict[str, Any]:
    """Every RNG a resumed run needs: the CPU's, and the GPU's (dropout draws there)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunWriter:
    """Writes one run folder; every method is a no-op on ranks other than 0.

    ``config`` is the run's resolved config as plain values, saved as it is in every checkpoint
    and ``summary.json`` and given to wandb; ``wandb_section`` is the ``wandb`` section (mode,
    project, group). The writer reads nothing else of the config.
    """

    def __init__(self, run_dir: Path, wandb_section: Any, config: Dict[str, Any], is_main: bool,
                 wandb_id: Optional[str] = None) -> None:
        self.run_dir, self.is_main, self.config = Path(run_dir), is_main, config
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self.wandb = _start_wandb(wandb_section, self.run_dir, config, wandb_id) if is_main else None
        # Kept when wandb is off this time, so a later resume with wandb on continues the first run.
        self.wandb_id: Optional[str] = self.wandb.id if self.wandb is not None else wandb_id

    def say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def epoch(self, record: Dict[str, Any], checkpoint: Dict[str, Any], improved: bool, history: List[Dict[str, Any]],
              epochs: int, best: float) -> None:
        """Checkpoints (best first), the metrics CSV, wandb and one console line for an epoch."""
        if not self.is_main:
            return
        save_epoch_checkpoints(checkpoint, self.ckpt_dir, improved)  # best.pt first, then last.pt
        write_metrics(self.run_dir / METRICS, history)
        if self.wandb is not None:
            self.wandb.log(record, step=record["epoch"])
        print(f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  train {record['train_accuracy']:.1%}  "
              f"val {record['val_accuracy']:.1%} (best {best:.1%})  {record['images_per_sec']:.0f} img/s  "
              f"{record['seconds']:.0f}s", flush=True)

    def checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """``last.pt`` alone, for a run stopped by a signal inside an epoch (metrics.csv has no row for it yet)."""
        if self.is_main:
            save_epoch_checkpoints(checkpoint, self.ckpt_dir, improved=False)

    def stopped(self) -> None:
        """Close the wandb run of a run stopped by a signal; the resumed run reopens it by its id."""
        if self.wandb is not None:
            self.wandb.finish(exit_code=EXIT_RESUMABLE)
            self.wandb = None

    def finish(self, summary: Summary) -> None:
        """``summary.json``, the last file of a run, through the run-folder module's typed Summary."""
        if not self.is_main:
            return
        write_summary(self.run_dir, summary)
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.to_dict().items() if k != "config"})
            self.wandb.finish()


def _start_wandb(section: Any, run_dir: Path, config: Dict[str, Any], run_id: Optional[str] = None) -> Optional[Any]:
    """The run's wandb run, or None (disabled, not installed, or it could not start).

    ``run_id`` is the id of the run this one resumes (None: wandb picks a new one); with
    ``resume="allow"`` wandb continues that run online, and offline writes a run folder with
    the same id, which ``wandb sync`` appends to it.
    """
    mode = section.mode
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.csv only.", flush=True)
        return None
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        print("No WANDB_API_KEY: wandb logs offline (sync later with `wandb sync`).", flush=True)
        mode = "offline"
    # Offline, wandb's own banner, run history, summary and sync hints (~25 lines) would bury the
    # epoch lines and the result; its silent setting drops them and one line below says where the
    # files are. Online keeps wandb's own lines: they carry the run's URL.
    settings = wandb.Settings(silent=True) if mode == "offline" else None
    try:
        run = wandb.init(project=section.project, group=section.group, dir=str(run_dir), mode=mode,
                         config=config, name=run_dir.name, reinit="finish_previous", settings=settings,
                         id=run_id, resume="allow" if run_id else None)
    except Exception as err:  # tracking must never kill a training run
        print(f"wandb could not start ({type(err).__name__}: {err}); logging to metrics.csv only.", flush=True)
        return None
    if mode == "offline":
        files = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>; run.dir is its files/ folder
        print(f"wandb offline: {files} (`wandb sync` that folder to upload it)", flush=True)
    return run
