"""``python run.py [overrides]``: train, then (outside sweeps) test the best checkpoint once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from inat.data.dataset import check_test_set
from inat.run_folder import BEST, TEST_DIR
from inat.runs import in_multirun, world
from inat.sweep.heartbeat import beating
from inat.sweep.prune import should_stop


def run(cfg: Any, out_dir: Path) -> Optional[float]:
    """Returns the best validation accuracy, the value an Optuna sweep maximises.

    Sweep trials never read the test folder, whatever ``train.then_test`` says.
    """
    rank, _ = world()
    will_test = cfg.train.then_test and not in_multirun()
    if will_test and rank == 0:
        # Names and paths only, before the whole training: a missing test set or a test class
        # training lacks would otherwise surface after summary.json was written.
        check_test_set(cfg.data)
    callback = None
    if in_multirun() and cfg.sweep.prune:
        def callback(record: dict) -> Optional[str]:
            return should_stop(cfg, Path(out_dir), record)

    with trial_heartbeat(cfg, rank):  # a sweep trial tells its study it is alive (inat.sweep.heartbeat)
        from inat.training import fit  # torch's import takes seconds: a trial killed meanwhile is found too

        summary = fit(cfg, out_dir, epoch_callback=callback)
    if rank == 0:
        print(f"best val accuracy {summary['best_val_accuracy']:.1%} at epoch {summary['best_epoch']} "
              f"({summary['stop_reason']}); {summary['train_images_per_sec']:.0f} img/s; run folder {out_dir}")
        if will_test:
            from inat.holdout import test_checkpoint  # torch, like fit above
            from inat.modes.test import print_test

            result = test_checkpoint(Path(out_dir) / BEST, Path(out_dir) / TEST_DIR,
                                     precision=cfg.train.precision)
            print_test(result)
    return float(summary["best_val_accuracy"])


def trial_heartbeat(cfg: Any, rank: int) -> Any:
    """This sweep trial's heartbeat in its Optuna study (storage, study name, trial number = job number)."""
    if not in_multirun() or rank != 0:
        return beating(None, None, None, 0.0)  # no sweep, no heartbeat
    hydra = HydraConfig.get()
    return beating(OmegaConf.select(hydra, "sweeper.storage"), OmegaConf.select(hydra, "sweeper.study_name"),
                   OmegaConf.select(hydra, "job.num"), cfg.sweep.heartbeat_seconds)
