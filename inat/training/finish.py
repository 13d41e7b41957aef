"""Recording and finishing a training run: epochs, checkpoints, the signal stop, temperature, summary.

``fit`` (``inat.training.loop``) hands each validated epoch to :func:`record_epoch` (its
metrics row and the best-so-far bookkeeping) and asks :func:`checkpoint_state` for what every
checkpoint holds. A run stopped by a signal ends in :func:`stop_for_signal`; one that ends,
after its last epoch, in :func:`calibrate` (the temperature and the rejection threshold of
``best.pt`` on the validation split) and :func:`run_summary` (the ``summary.json`` the writer
puts down last).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, NoReturn, Optional, Tuple

import numpy as np
import torch

from inat.calibration import apply_temperature, choose_temperature, choose_threshold, temperature_record, threshold_record
from inat.checkpoint import load_checkpoint, save_checkpoint
from inat.data.balance import imbalance
from inat.errors import Preempted
from inat.inference import batched_logits
from inat.models import model_from_state
from inat.run_folder import BEST, LAST, Summary
from inat.runs import world
from inat.training import distributed
from inat.training.build import Setup
from inat.training.preemption import StopSignals
from inat.training.resize import ResizeChoice
from inat.training.writer import environment, rng_state

# The epoch-end decision that a stop signal ends the run here (never a summary's stop_reason).
PREEMPTED = "preempted"


def record_epoch(s: Setup, epoch: int, row: Dict[str, float], val_loss: float,
                 val_acc: float) -> Tuple[Dict[str, Any], bool]:
    """Epoch ``epoch`` (0-based) done: its metrics row, kept in ``state["history"]``, and whether it is the best yet."""
    state = s.state
    state["epoch"] = epoch + 1
    record = {"epoch": epoch + 1, "train_loss": round(row["train_loss"], 6),
              "train_accuracy": round(row["train_accuracy"], 6), "val_loss": round(val_loss, 6),
              "val_accuracy": round(val_acc, 6), "lr": row["lr"], "images_per_sec": round(row["images_per_sec"], 1),
              "seconds": round(state["train_seconds"], 2)}
    state["history"].append(record)
    improved = val_acc > state["best_val_accuracy"]
    if improved:
        state["best_val_accuracy"], state["best_epoch"], state["bad_epochs"] = val_acc, epoch + 1, 0
    else:
        state["bad_epochs"] += 1
    return record, improved


def stop_for_signal(s: Setup, run_dir: Path, signals: StopSignals) -> NoReturn:
    """End a run stopped by a signal whose ``last.pt`` is written: wandb closed, every rank out together.

    The ranks leave the process group together (its barrier), so none exits while rank 0 is
    still writing; then each raises :class:`Preempted`, whose sentence (rank 0's) the command
    prints before exiting with ``EXIT_RESUMABLE``.
    """
    rank, _ = world()
    partial, epochs = s.state.get("partial"), s.recipe.epochs
    where = (f"in epoch {partial['epoch'] + 1}/{epochs} after batch {partial['batches']}/{partial['of']}" if partial
             else f"after epoch {s.state['epoch']}/{epochs}")
    s.writer.say(f"stopped by {signals.names()} {where}: {run_dir / LAST} written")
    s.writer.stopped()
    distributed.destroy()
    raise Preempted(f"Stopped by {signals.names()} {where}; {run_dir / LAST} holds the run: rerun the same command "
                    f"with resume=auto hydra.run.dir={run_dir} to continue it." if rank == 0 else "")


def checkpoint_state(s: Setup) -> Dict[str, Any]:
    """What ``best.pt`` and ``last.pt`` hold: weights, EMA, optimizer, loop state, RNG, config and split hashes."""
    data, ema = s.data, s.ema
    return {"config": s.writer.config, "classes": data.classes, "spec": s.model.spec.to_dict(),
            "model": s.model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "ema_full": ema.state_dict() if ema is not None else None, "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None, "state": s.state,
            "rng": rng_state(s.device), "precision": s.precision.name, "wandb_id": s.writer.wandb_id,
            "split_sha1": {"train": [data.sha1[i] for i in data.train_idx], "val": [data.sha1[i] for i in data.val_idx]}}


def calibrate(s: Setup, run_dir: Path) -> Dict[str, Any]:
    """Temperature scaling and the rejection threshold of the best checkpoint, on the validation
    split (never the test folder); returns the record stored in best.pt, last.pt and summary.json.

    The full model runs on the validation images whatever the training input was (cached
    features or prefix views give no logits of the saved model). T is fitted on the logits test
    mode scores with (the run's ``aug.tta_flip``); the threshold (``predict.target_precision``)
    on the calibrated probabilities predict computes by default: without the flip.
    """
    best = load_checkpoint(run_dir / BEST)
    model = model_from_state(best).to(s.device)
    spec, images, labels = model.spec, np.asarray(s.data.images[s.data.val_idx]), s.data.labels[s.data.val_idx]
    recipe = s.recipe

    def val_logits(tta_flip: bool) -> torch.Tensor:
        return batched_logits(model, images, spec.mean, spec.std, s.precision, batch_size=recipe.eval_batch_size,
                              tta_flip=tta_flip, device=s.device, channels_last=False)

    tta = recipe.tta_flip
    logits = val_logits(tta)
    choice = choose_temperature(logits, labels)  # may keep the raw softmax (T None)
    plain = val_logits(False) if tta else logits
    # Predictor.probabilities_of's arithmetic (float32), so predict compares the same numbers.
    probs = apply_temperature(plain, choice.temperature).softmax(dim=1)
    threshold = choose_threshold(probs, labels, recipe.target_precision)
    record = {**temperature_record(choice), **threshold_record(threshold, temperature=choice.temperature, tta_flip=False)}
    for name in (BEST, LAST):
        state = best if name == BEST else load_checkpoint(run_dir / name)
        state.update(record)
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, run_dir / name)
    s.writer.say(choice.note)
    s.writer.say(threshold.note)
    return record


def run_summary(s: Setup, stop_reason: str, wall: float, calibration: Optional[Dict[str, Any]]) -> Summary:
    """The run's ``summary.json``: best and last accuracy, throughput, sizes, precision, environment, config."""
    state, hist, model, data = s.state, s.state["history"], s.model, s.data
    _, world_size = world()
    rates = [h["images_per_sec"] for h in hist]
    return Summary(
        best_val_accuracy=state["best_val_accuracy"], val_accuracy=hist[-1]["val_accuracy"] if hist else None,
        best_epoch=state["best_epoch"], epochs=state["epoch"], steps=state["step"], stop_reason=stop_reason,
        train_images_per_sec=round(sum(rates) / max(1, len(rates)), 1),
        # Epoch 1 carries cuDNN autotuning, compilation and cold caches; the later epochs are the steady rate.
        first_epoch_images_per_sec=rates[0] if rates else None,
        steady_images_per_sec=round(sum(rates[1:]) / len(rates[1:]), 1) if len(rates) > 1 else None,
        train_seconds=round(state["train_seconds"], 2), wall_seconds=round(wall, 2),
        cache_seconds=round(s.cache_seconds, 2), params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad), model=model.spec.name,
        classes=data.classes, n_train=int(len(data.train_idx)), n_val=int(len(data.val_idx)), device=str(s.device),
        world_size=world_size, precision=s.precision.name, precision_reason=s.precision.reason, input=s.source.kind,
        resize=ResizeChoice(s.resize, s.resize_reason).name, resize_reason=s.resize_reason,
        environment=environment(s.device), config=s.writer.config,
        **imbalance(data.labels[data.train_idx], len(data.classes)),
        **(calibration or {**temperature_record(None), **threshold_record(None)}))
