"""The training loop: ``setup`` (``build``) -> ``train_one_epoch`` / ``validate`` per epoch -> ``finish``.

The host never waits for the device inside an epoch: the loss and correct counts stay on
the device and are read once per epoch (and at the progress bar's log interval), and the
epoch's time is taken after that read, when the device has finished the epoch's work. Under
torchrun every stopping decision is rank 0's, broadcast (see ``inat.training.distributed``),
and each rank validates its share of the validation split.

A stop signal (SIGTERM, SIGUSR1, SIGUSR2; ``inat.training.preemption``) ends the epoch after
the current step: ``last.pt`` then records the position inside the epoch (batches done, the
partial sums, the epoch's random draws), and ``resume=auto`` goes on from the next batch, so an
epoch-driven run ends bit-exact with the run that was never stopped.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig

from inat.data.dataset import describe_roles
from inat.errors import Preempted
from inat.run_folder import LAST
from inat.runs import acquire_run_lock, world
from inat.training import distributed
from inat.training.build import Setup, backend_flags, class_weight_tensor, loss_fn, restore_backends, setup
from inat.training.collectives import sum_over_ranks
from inat.training.data import SEED_AUG, epoch_order
from inat.training.finish import calibrate, checkpoint_state, run_summary
from inat.training.optim import lr_factor, set_lr
from inat.training.preemption import StopSignals


class Budget:
    """Training time, schedule progress and stop signals as rank 0 sees them.

    In one process the clock and ``stop_requested()`` are read every step (no device sync).
    Under DDP rank 0's elapsed time and whether rank 0 was signalled travel in one broadcast
    every ``every`` steps, so every rank applies the same learning rate and stops at the same
    step, for the time budget or a signal.
    """

    def __init__(self, seconds: float, total_steps: int, device: torch.device, every: int = 8,
                 stop_requested: Optional[Callable[[], bool]] = None) -> None:
        self.seconds, self.total_steps, self.device = seconds, max(1, total_steps), device
        self.every = every if distributed.active() else 1
        self.spent, self.t0, self.elapsed = 0.0, 0.0, 0.0
        self.stop_requested = stop_requested or (lambda: False)
        self._stop_seen = False  # rank 0's stop_requested() at the last tick (DDP)

    def start(self, spent: float) -> None:
        self.spent, self.t0, self.elapsed = spent, time.perf_counter(), spent

    def tick(self, step_in_epoch: int) -> None:
        if step_in_epoch % self.every == 0:
            elapsed, stop = distributed.broadcast_floats([self.spent + time.perf_counter() - self.t0,
                                                          float(self.stop_requested())])
            self.elapsed, self._stop_seen = elapsed, stop > 0

    @property
    def stop(self) -> bool:
        """Stop after this step for a signal: now in one process, as of the last tick under DDP."""
        return self._stop_seen if distributed.active() else self.stop_requested()

    def progress(self, step: int) -> float:
        p = step / self.total_steps
        return min(1.0, max(p, self.elapsed / self.seconds) if self.seconds > 0 else p)

    @property
    def over(self) -> bool:
        return self.seconds > 0 and self.elapsed >= self.seconds

    def epoch_seconds(self) -> float:
        """This epoch's training seconds, rank 0's on every rank."""
        return distributed.broadcast_float(time.perf_counter() - self.t0)


def train_one_epoch(s: Setup, epoch: int, budget: Budget, criterion: Callable) -> Optional[Dict[str, float]]:
    """One pass over this rank's share of a seeded permutation; returns the epoch's train metrics.

    Returns None when a stop signal ended the epoch early: ``state["partial"]`` then holds
    where it stopped, and a resumed run's call for the same epoch goes on from there.
    """
    from tqdm import tqdm

    cfg, state, optimizer, device = s.cfg, s.state, s.optimizer, s.device
    rank, world_size = world()
    bs = int(cfg.train.batch_size)
    perm, n_batches = epoch_order(s.data, cfg.seed, epoch, bs, rank, world_size, bool(cfg.train.balanced_sampler))
    warmup = float(cfg.optim.warmup_epochs) / max(1, int(cfg.train.epochs))
    log_every = int(cfg.train.log_every) or 50
    step_module = s.wrapper.refresh()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, start, spent = 0, 0, 0.0
    draws = s.source.draws(cfg.seed * 1000 + SEED_AUG + 7919 * epoch + 104729 * rank)
    partial = state.pop("partial", None)  # this epoch was stopped by a signal after `start` batches
    if partial is not None:
        assert partial["epoch"] == epoch and len(partial["ranks"]) == world_size, (partial["epoch"], epoch)
        mine = partial["ranks"][rank]
        start, spent, seen = int(partial["batches"]), float(partial["seconds"]), int(mine["seen"])
        loss_sum, correct = mine["loss_sum"].to(device), mine["correct"].to(device)
        draws.restore(mine["draws"])
    budget.start(state["train_seconds"])
    bar = tqdm(total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=rank != 0, mininterval=1.0)
    batches = s.source.batches(perm, bs, n_batches, start=start, draws=draws)
    stopped = False
    for b, (x, target) in enumerate(batches, start):
        budget.tick(b)
        progress = budget.progress(state["step"])
        set_lr(optimizer, lr_factor(progress, warmup, cfg.optim.schedule))
        if s.resize is not None:
            x = s.resize(x, progress)
        with s.precision.autocast():
            logits = step_module(x)
            loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            s.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(s.model.parameters(), float(cfg.optim.grad_clip))
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
        if rank == 0 and b > 0 and b % log_every == 0:  # the only sync inside the epoch
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


def validate(s: "Setup", model: nn.Module) -> Tuple[float, float]:
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


def _stop_reason(s: Setup, record: Dict[str, Any], budget: Budget, callback: Optional[Callable]) -> Optional[str]:
    """Why training ends after this epoch (None: it goes on). Evaluated on rank 0 only."""
    cfg, state = s.cfg, s.state
    reason = callback(record) if callback is not None else None
    if reason:
        return f"pruned: {reason}"
    if cfg.train.early_stopping > 0 and state["bad_epochs"] >= int(cfg.train.early_stopping):
        return "early_stopping"
    if budget.seconds > 0 and state["train_seconds"] >= budget.seconds:
        return "budget"
    return None


class Callback:
    """What a tool or a test may run inside :func:`fit`, on every rank; both methods default to nothing.

    ``on_epoch_end(setup, record)`` runs after the epoch's checkpoint and metrics row are
    written, before the stop decision; ``on_finish(setup)`` after ``summary.json``, before the
    process group is left. Neither can change how the run goes on (``epoch_callback`` can).
    """

    def on_epoch_end(self, setup: Setup, record: Dict[str, Any]) -> None:
        pass

    def on_finish(self, setup: Setup) -> None:
        pass


# Callbacks every fit in this process runs besides its own ``callbacks``: for a wrapper that starts a
# command whose fit it cannot call itself (the tests' fault injection around run.py).
CALLBACKS: List[Callback] = []


def fit(cfg: DictConfig, run_dir: Path,
        epoch_callback: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None,
        callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Train with the composed config, writing the run folder; returns the summary dict.

    ``epoch_callback(record)`` runs on rank 0 after each epoch's checkpoint; a non-empty
    string it returns stops training with ``stop_reason = "pruned: <reason>"`` (sweeps use it
    to stop weak trials early without this module knowing about sweeps). ``callbacks`` (and
    those in :data:`CALLBACKS`) see each epoch's end and the finish (:class:`Callback`). Rank 0
    holds the run folder's lock throughout: a second training into the same folder is refused.
    """
    rank, _ = world()
    flags = backend_flags()
    signals = StopSignals()
    try:
        with signals, acquire_run_lock(Path(run_dir)) if rank == 0 else contextlib.nullcontext():
            return _fit(cfg, Path(run_dir), epoch_callback, [*CALLBACKS, *callbacks], signals)
    except Preempted:
        signals.hand_over()  # last.pt is written and the lock released: a previous handler (submitit's) may exit now
        raise
    finally:
        restore_backends(flags)  # deterministic kernels or autotuning were this run's, not the process's


def _fit(cfg: DictConfig, run_dir: Path, epoch_callback: Optional[Callable], callbacks: Sequence[Callback],
         signals: StopSignals) -> Dict[str, Any]:
    t_start = time.perf_counter()
    s = setup(cfg, run_dir)
    rank, world_size = world()
    state, epochs, spec = s.state, int(cfg.train.epochs), s.model.spec
    steps_per_epoch = max(1, (len(s.data.train_idx) // world_size) // int(cfg.train.batch_size))
    budget = Budget(float(cfg.train.max_minutes) * 60, epochs * steps_per_epoch, s.device,
                    stop_requested=lambda: signals.requested)
    criterion = loss_fn(cfg, class_weight_tensor(s))
    s.writer.say(f"{spec.name}: {sum(p.numel() for p in s.model.parameters()):,} parameters, {len(s.data.classes)} "
                 f"classes, {len(s.data.train_idx)} train / {len(s.data.val_idx)} val images at {spec.input_size}px "
                 f"on {s.device}, input: {s.source.kind}")
    s.writer.say(f"data: {describe_roles(cfg.data, s.data.root)}")
    stop_reason = "epochs"
    for epoch in range(state["epoch"], epochs):
        if cfg.finetune.strategy != "none":
            from inat.models.freeze import on_epoch_start, set_train_mode

            on_epoch_start(s.model, cfg.finetune, epoch)
            set_train_mode(s.model, cfg.finetune)
        else:
            s.model.train()
        row = train_one_epoch(s, epoch, budget, criterion)
        if row is None:  # a stop signal inside the epoch: state["partial"] says where
            s.writer.checkpoint(checkpoint_state(s) if rank == 0 else {})
            _stop_for_signal(s, run_dir, signals)
        val_loss, val_acc = validate(s, s.ema.module if s.ema is not None else s.model)
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
        s.writer.epoch(record, checkpoint_state(s) if rank == 0 else {}, improved, state["history"], epochs,
                       state["best_val_accuracy"])
        for callback in callbacks:
            callback.on_epoch_end(s, record)
        reason = _stop_reason(s, record, budget, epoch_callback) if rank == 0 else None
        if rank == 0 and reason is None and signals.requested and epoch + 1 < epochs:
            reason = PREEMPTED  # signalled during validation or the checkpoint: last.pt is this epoch's
        reason = distributed.decide(reason)
        if reason == PREEMPTED:
            _stop_for_signal(s, run_dir, signals)
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


# The epoch-end decision that a stop signal ends the run here (never a summary's stop_reason).
PREEMPTED = "preempted"


def _stop_for_signal(s: Setup, run_dir: Path, signals: StopSignals) -> NoReturn:
    """End a run stopped by a signal whose ``last.pt`` is written: wandb closed, every rank out together.

    The ranks leave the process group together (its barrier), so none exits while rank 0 is
    still writing; then each raises :class:`Preempted`, whose sentence (rank 0's) the command
    prints before exiting with ``EXIT_RESUMABLE``.
    """
    rank, _ = world()
    partial, epochs = s.state.get("partial"), int(s.cfg.train.epochs)
    where = (f"in epoch {partial['epoch'] + 1}/{epochs} after batch {partial['batches']}/{partial['of']}" if partial
             else f"after epoch {s.state['epoch']}/{epochs}")
    s.writer.say(f"stopped by {signals.names()} {where}: {run_dir / LAST} written")
    s.writer.stopped()
    distributed.destroy()
    raise Preempted(f"Stopped by {signals.names()} {where}; {run_dir / LAST} holds the run: rerun the same command "
                    f"with resume=auto hydra.run.dir={run_dir} to continue it." if rank == 0 else "")
