"""The training loop: ``build`` -> ``train_one_epoch`` / ``validate`` per epoch -> ``finish``.

The host never waits for the device inside an epoch: loss and correct counts stay on the device
and are read once per epoch (and at the progress bar's log interval); the epoch's time is taken
after that read. Under torchrun every stopping decision is rank 0's, broadcast
(``inat.training.distributed``), and each rank validates its share of the validation split.
A stop signal (``inat.training.preemption``) ends the epoch after the current step: ``last.pt``
records the position inside the epoch, and ``resume=auto`` goes on from the next batch, so an
epoch-driven run ends bit-exact with the run that was never stopped.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig
from tqdm import tqdm

from inat.errors import Preempted
from inat.models.freeze import on_epoch_start, set_train_mode
from inat.runs import acquire_run_lock, world
from inat.training import distributed
from inat.training.budget import Budget
from inat.training.build import Setup, backend_flags, build, class_weight_tensor, loss_fn, restore_backends
from inat.training.callbacks import CALLBACKS, Callback
from inat.training.collectives import sum_over_ranks
from inat.training.data import SEED_AUG, epoch_order
from inat.training.finish import PREEMPTED, calibrate, checkpoint_state, record_epoch, run_summary, stop_for_signal
from inat.training.optim import lr_factor, set_lr
from inat.training.preemption import StopSignals


def train_one_epoch(s: Setup, epoch: int, budget: Budget, criterion: Callable) -> Optional[Dict[str, float]]:
    """One pass over this rank's share of a seeded permutation; returns the epoch's train metrics.

    Returns None when a stop signal ended the epoch early: ``state["partial"]`` then holds
    where it stopped, and a resumed run's call for the same epoch goes on from there.
    """
    recipe, state, optimizer, device = s.recipe, s.state, s.optimizer, s.device
    rank, world_size = world()
    bs = recipe.batch_size
    perm, n_batches = epoch_order(s.data, recipe.seed, epoch, bs, rank, world_size, recipe.balanced_sampler)
    step_module = s.wrapper.refresh()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, start, spent = 0, 0, 0.0
    draws = s.source.draws(recipe.seed * 1000 + SEED_AUG + 7919 * epoch + 104729 * rank)
    partial = state.pop("partial", None)  # this epoch was stopped by a signal after `start` batches
    if partial is not None:
        assert partial["epoch"] == epoch and len(partial["ranks"]) == world_size, (partial["epoch"], epoch)
        mine = partial["ranks"][rank]
        start, spent, seen = int(partial["batches"]), float(partial["seconds"]), int(mine["seen"])
        loss_sum, correct = mine["loss_sum"].to(device), mine["correct"].to(device)
        draws.restore(mine["draws"])
    budget.start(state["train_seconds"])
    bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False,
               disable=rank != 0, mininterval=1.0)
    stopped = False
    for b, (x, target) in enumerate(s.source.batches(perm, bs, n_batches, start=start, draws=draws), start):
        budget.tick(b)
        progress = budget.progress(state["step"])
        set_lr(optimizer, lr_factor(progress, recipe.warmup, recipe.schedule))
        if s.resize is not None:  # progressive resizing: this step's side
            x = s.resize(x, progress)
        with s.precision.autocast():
            logits = step_module(x)
            loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if recipe.grad_clip > 0:
            s.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(s.model.parameters(), recipe.grad_clip)
        s.scaler.step(optimizer)
        s.scaler.update()
        if s.ema is not None:
            s.ema.update()
        state["step"] += 1
        hard = target.argmax(1) if target.ndim == 2 else target
        correct += (logits.argmax(1) == hard).sum()
        loss_sum += loss.detach() * len(hard)
        seen += len(hard)
        bar.update(1)
        if rank == 0 and b > 0 and b % recipe.log_every == 0:  # the only sync inside the epoch
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if budget.over:
            break
        if budget.stop:  # a stop signal (rank 0's): this step is done, the next batch not yet drawn
            stopped = True
            break
    bar.close()
    # The read waits for the device: the steps still queued there belong to this epoch's time.
    train_loss, n_correct = loss_sum.item(), correct.item()
    dt = budget.epoch_seconds()
    state["train_seconds"] += dt
    if stopped:
        # Each rank's sums and draws, gathered for rank 0's last.pt: plain numbers and CPU tensors (it is
        # loaded with weights_only), the sums as exact tensors. The step and the time are the same on every rank.
        mine = {"seen": seen, "loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "draws": draws.state()}
        state["partial"] = {"epoch": epoch, "batches": b + 1, "of": n_batches, "seconds": spent + dt,
                            "ranks": distributed.gather(mine)}
        return None
    dt += spent  # a resumed epoch's time: before the stop and after the resume
    return {"train_loss": train_loss / max(seen, 1), "train_accuracy": n_correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"], "images_per_sec": seen * world_size / max(dt, 1e-9)}


def validate(s: Setup, model: nn.Module) -> Tuple[float, float]:
    """Validation ``(loss, accuracy)`` of ``model``, the same on every rank.

    In one process the source scores the whole split. Under torchrun each rank scores its
    shard and one all-reduce per epoch sums (loss x n, correct, n) over the ranks.
    """
    if not distributed.active():
        loss, acc = s.source.evaluate(model)
        return float(loss), float(acc)
    n = len(s.source.val_labels)
    loss, acc = (float(v) for v in s.source.evaluate(model)) if n else (0.0, 0.0)
    loss_sum, correct, total = sum_over_ranks([loss * n, round(acc * n), n], s.device)
    return loss_sum / total, correct / total


def _stop_reason(s: Setup, record: Dict[str, Any], budget: Budget, callback: Optional[Callable],
                 signals: StopSignals) -> Optional[str]:
    """Why training ends after this epoch (None: it goes on). Evaluated on rank 0 only."""
    patience = s.recipe.early_stopping
    reason = callback(record) if callback is not None else None
    if reason:
        return f"pruned: {reason}"
    if patience > 0 and s.state["bad_epochs"] >= patience:
        return "early_stopping"
    if budget.seconds > 0 and s.state["train_seconds"] >= budget.seconds:
        return "budget"
    if signals.requested and record["epoch"] < s.recipe.epochs:
        return PREEMPTED  # signalled during validation or the checkpoint: last.pt is this epoch's
    return None


def fit(cfg: DictConfig, run_dir: Path,
        epoch_callback: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None,
        callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Train with the composed config, writing the run folder; returns the summary dict.

    ``epoch_callback(record)`` runs on rank 0 after each epoch's checkpoint; a non-empty
    string it returns stops training with ``stop_reason = "pruned: <reason>"`` (sweeps use it
    to stop weak trials early without this module knowing about sweeps). ``callbacks`` (and
    those in ``callbacks.CALLBACKS``) see each epoch's end and the finish (:class:`Callback`).
    Rank 0 holds the run folder's lock throughout: a second training into the same folder is refused.
    """
    flags, signals = backend_flags(), StopSignals()
    try:
        with signals, acquire_run_lock(Path(run_dir)) if world()[0] == 0 else contextlib.nullcontext():
            return _fit(cfg, Path(run_dir), epoch_callback, [*CALLBACKS, *callbacks], signals)
    except Preempted:
        signals.hand_over()  # last.pt is written and the lock released: a previous handler (submitit's) may exit now
        raise
    finally:
        restore_backends(flags)  # deterministic kernels or autotuning were this run's, not the process's


def _fit(cfg: DictConfig, run_dir: Path, epoch_callback: Optional[Callable], callbacks: Sequence[Callback],
         signals: StopSignals) -> Dict[str, Any]:
    t_start = time.perf_counter()
    s = build(cfg, run_dir)  # the config's last reader: from here on the run is s and s.recipe
    recipe, state, (rank, world_size) = s.recipe, s.state, world()
    steps_per_epoch = max(1, (len(s.data.train_idx) // world_size) // recipe.batch_size)
    budget = Budget(recipe.budget_seconds, recipe.epochs * steps_per_epoch, s.device,
                    stop_requested=lambda: signals.requested)
    criterion = loss_fn(recipe, class_weight_tensor(s))
    stop_reason = "epochs"
    for epoch in range(state["epoch"], recipe.epochs):
        on_epoch_start(s.model, recipe.finetune, epoch)  # gradual fine-tuning unfreezes here; the rest keep theirs
        set_train_mode(s.model, recipe.finetune)  # model.train(), BatchNorm of frozen groups kept in eval mode
        row = train_one_epoch(s, epoch, budget, criterion)
        if row is None:  # a stop signal inside the epoch: state["partial"] says where
            s.writer.checkpoint(checkpoint_state(s) if rank == 0 else {})
            stop_for_signal(s, run_dir, signals)
        record, improved = record_epoch(s, epoch, row, *validate(s, s.ema.module if s.ema is not None else s.model))
        s.writer.epoch(record, checkpoint_state(s) if rank == 0 else {}, improved, state["history"], recipe.epochs,
                       state["best_val_accuracy"])
        for callback in callbacks:
            callback.on_epoch_end(s, record)
        reason = distributed.decide(_stop_reason(s, record, budget, epoch_callback, signals) if rank == 0 else None)
        if reason == PREEMPTED:
            stop_for_signal(s, run_dir, signals)
        if reason:
            stop_reason = reason
            if reason.startswith("pruned"):
                s.writer.say(f"stopped early: {reason[len('pruned: '):]}")
            break
    calibration = calibrate(s, run_dir) if rank == 0 and state["epoch"] > 0 else None
    summary = run_summary(s, stop_reason, time.perf_counter() - t_start, calibration)
    s.writer.finish(summary)
    for callback in callbacks:
        callback.on_finish(s)
    distributed.destroy()
    return summary.to_dict()
