"""The training loop: ``setup`` -> ``train_one_epoch`` / evaluate per epoch -> ``finish``.

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
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, NoReturn, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from inat.calibration import TemperatureChoice, choose_temperature, temperature_record
from inat.checkpoint import load_checkpoint
from inat.data.folder import scan_train
from inat.data.split import write_manifest
from inat.errors import InatError, Preempted
from inat.inference import Precision, pick_device, process_precision
from inat.models import InatModel, build_from_config
from inat.run_folder import LAST, Summary
from inat.runs import acquire_run_lock, world
from inat.training import distributed, resume
from inat.training.collectives import sum_over_ranks
from inat.training.data import SEED_AUG, SEED_INIT, TrainData, epoch_order, load_data, resolve_root
from inat.training.ema import ModelEMA
from inat.training.optim import check_schedule, lr_factor, make_optimizer, set_lr
from inat.training.preemption import StopSignals
from inat.training.sources import FeatureSource, ImageSource, PrefixViewSource
from inat.training.writer import RunWriter, environment, rng_state


@dataclass
class Setup:
    """Everything one training run holds, built by :func:`setup`."""

    cfg: DictConfig
    device: torch.device
    precision: Precision
    model: InatModel
    data: TrainData
    source: Any  # ImageSource | FeatureSource | PrefixViewSource
    optimizer: torch.optim.Optimizer
    scaler: Any
    wrapper: Optional[distributed.Wrapper]  # built once the source says which module the step trains
    writer: RunWriter
    ema: Optional[ModelEMA] = None
    cache_seconds: float = 0.0
    state: Dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "step": 0, "train_seconds": 0.0,
                                                           "best_val_accuracy": -1.0, "best_epoch": 0,
                                                           "bad_epochs": 0, "history": []})


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


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning for speed, or deterministic kernels when a resumed GPU run must be exact.

    These flags are process-global; ``fit`` puts back what it found (:func:`backend_flags`),
    so one deterministic sweep trial does not leave the later trials deterministic and untuned.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def backend_flags() -> Dict[str, Any]:
    """The process-global settings :func:`configure_backends` changes, to restore with :func:`restore_backends`."""
    cudnn = torch.backends.cudnn
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": cudnn.deterministic, "cudnn_benchmark": cudnn.benchmark,
            "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def restore_backends(flags: Dict[str, Any]) -> None:
    torch.use_deterministic_algorithms(flags["deterministic"], warn_only=flags["warn_only"])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (flags["cudnn_deterministic"],
                                                                          flags["cudnn_benchmark"])
    if flags["cublas_workspace"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = flags["cublas_workspace"]


def loss_fn(cfg: DictConfig, weight: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with the recipe's label smoothing and, with ``train.class_weights=auto``, class weights."""
    smoothing = float(cfg.optim.label_smoothing)
    return lambda logits, target: F.cross_entropy(logits.float(), target, label_smoothing=smoothing, weight=weight)


def class_weight_tensor(s: "Setup") -> Optional[torch.Tensor]:
    from inat.data.balance import class_weights

    w = class_weights(s.data.labels[s.data.train_idx], s.model.spec.num_classes, str(s.cfg.train.class_weights))
    return None if w is None else w.to(s.device)


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
        set_lr(optimizer, lr_factor(budget.progress(state["step"]), warmup, cfg.optim.schedule))
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


def setup(cfg: DictConfig, run_dir: Path) -> Setup:
    """Device, precision, data, model, optimizer, input source and writer of a run (resumed if asked)."""
    rank, world_size = world()
    is_main = rank == 0
    if int(cfg.train.threads) > 0:
        torch.set_num_threads(int(cfg.train.threads))
    device = pick_device()
    distributed.init(device)
    check_same_run_dir(Path(run_dir), device)
    configure_backends(device, bool(cfg.train.deterministic))
    check_schedule(cfg.optim.schedule)
    precision = process_precision(cfg.train.precision, device, announce=is_main)
    root = resolve_root(cfg.data)
    folder = scan_train(root)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    saved = resume.load_last(Path(run_dir), cfg_dict, cfg.resume)
    if saved is None and cfg.resume == "auto" and is_main:
        print(f"resume=auto: run folder '{run_dir}' holds no run yet; training from the start.", flush=True)
    torch.manual_seed(cfg.seed * 1000 + SEED_INIT)
    model: InatModel = build_from_config(cfg, len(folder.classes))
    spec = model.spec
    if cfg.finetune.strategy != "none":
        from inat.models.freeze import setup_finetune

        setup_finetune(model, cfg.finetune)
    data = load_data(cfg.data, spec, root, folder, progress=is_main)
    if saved is not None:  # before split.json is rewritten: a refused resume leaves the run folder as it was
        resume.check_same_split(saved, data, Path(run_dir))
    if is_main:
        write_manifest(Path(run_dir) / "split.json", root, folder.classes, folder.paths, folder.labels, data.sha1,
                       data.train_idx, data.val_idx, int(cfg.data.split_seed), float(cfg.data.val_fraction))
    if world_size > 1 and cfg.train.sync_bn:
        model = distributed.convert_sync_bn(model)
    model.to(device)
    channels_last = bool(cfg.train.channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.train, cfg.optim, cfg.finetune, device)
    ema = ModelEMA(model, float(cfg.train.ema)) if float(cfg.train.ema) > 0 else None
    s = Setup(cfg, device, precision, model, data, None, optimizer, precision.grad_scaler(), None,
              RunWriter(run_dir, cfg, cfg_dict, is_main, wandb_id=saved.get("wandb_id") if saved else None), ema)
    if saved is not None:
        resume.restore(s, Path(run_dir), saved)
    t_cache = time.perf_counter()
    s.source = _source(s, channels_last, is_main)
    s.cache_seconds = time.perf_counter() - t_cache
    if not isinstance(s.source, ImageSource):
        s.writer.say(f"frozen outputs cached once in {s.cache_seconds:.0f} s ({s.source.bytes / 2**20:.0f} MiB): "
                     f"{s.source.kind}")
    # The step trains source.module: the model, or only its head (cached features) or suffix (prefix views).
    s.wrapper = distributed.Wrapper(s.source.module, device, compile=bool(cfg.train.compile))
    if world_size > 1:
        shard_validation(s.source, rank, world_size)
    return s


def check_same_run_dir(run_dir: Path, device: torch.device) -> None:
    """Refuse a torchrun job whose ranks were given different run folders (no-op in one process).

    Rank 0 alone writes and reads the run folder, but a later ``resume=true`` must name it, and
    Hydra's default folder is the start time, which differs between ranks started in different
    seconds or on different nodes.
    """
    mine = str(run_dir.absolute())
    others = sum_over_ranks([distributed.decide(mine) != mine], device)[0]  # ranks whose folder is not rank 0's
    if others:
        raise InatError(f"Under torchrun every rank must use the same run folder, and {others:.0f} rank(s) got another "
                        f"one than rank 0 (Hydra's default is the start time, which differs between ranks): set "
                        f"hydra.run.dir=RUN_DIR on the command line.")


def shard_validation(source: ImageSource, rank: int, world_size: int) -> None:
    """Keep this rank's share of the validation images (every ``world_size``-th from ``rank``).

    Under torchrun the input is always images (cached features and prefix views run in one
    process), and :func:`validate` adds the ranks' shares up, so no rank scores the whole split.
    """
    assert isinstance(source, ImageSource), type(source)
    source.val_images = source.val_images[rank::world_size]
    source.val_labels = source.val_labels[rank::world_size]


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


def _source(s: Setup, channels_last: bool, progress: bool):
    cfg, ft = s.cfg, s.cfg.finetune
    common = dict(channels_last=channels_last, eval_batch_size=int(cfg.train.eval_batch_size))
    _, world_size = world()
    if ft.strategy == "linear_probe" and ft.cached_features:
        if world_size == 1:
            return FeatureSource(s.model, s.data, s.model.spec, s.precision, s.device, progress=progress, **common)
        s.writer.say("finetune.cached_features works in one process: under torchrun the linear probe runs the "
                     "frozen backbone on the augmented images every step instead (slower).")
    if ft.strategy == "partial" and int(ft.cache_views) > 0:
        if world_size > 1:
            raise InatError("finetune.cache_views works in one process; set finetune.cache_views=0 under torchrun.")
        return PrefixViewSource(s.model, s.data, s.model.spec, cfg.aug, ft, s.precision, s.device, seed=cfg.seed,
                                tta_flip=bool(cfg.aug.tta_flip), progress=progress, **common)
    return ImageSource(s.model, s.data, s.model.spec, cfg.aug, s.precision, s.device,
                       tta_flip=bool(cfg.aug.tta_flip), **common)


def _checkpoint(s: Setup) -> Dict[str, Any]:
    data, ema = s.data, s.ema
    return {"config": s.writer.cfg_dict, "classes": data.classes, "spec": s.model.spec.to_dict(),
            "model": s.model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "ema_full": ema.state_dict() if ema is not None else None, "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None, "state": s.state,
            "rng": rng_state(s.device), "precision": s.precision.name, "wandb_id": s.writer.wandb_id,
            "split_sha1": {"train": [data.sha1[i] for i in data.train_idx], "val": [data.sha1[i] for i in data.val_idx]}}


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


def fit(cfg: DictConfig, run_dir: Path,
        epoch_callback: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None) -> Dict[str, Any]:
    """Train with the composed config, writing the run folder; returns the summary dict.

    ``epoch_callback(record)`` runs on rank 0 after each epoch's checkpoint; a non-empty
    string it returns stops training with ``stop_reason = "pruned: <reason>"`` (sweeps use it
    to stop weak trials early without this module knowing about sweeps). Rank 0 holds the
    run folder's lock throughout: a second training into the same folder is refused.
    """
    rank, _ = world()
    flags = backend_flags()
    signals = StopSignals()
    try:
        with signals, acquire_run_lock(Path(run_dir)) if rank == 0 else contextlib.nullcontext():
            return _fit(cfg, Path(run_dir), epoch_callback, signals)
    except Preempted:
        signals.hand_over()  # last.pt is written and the lock released: a previous handler (submitit's) may exit now
        raise
    finally:
        restore_backends(flags)  # deterministic kernels or autotuning were this run's, not the process's


def _fit(cfg: DictConfig, run_dir: Path, epoch_callback: Optional[Callable], signals: StopSignals) -> Dict[str, Any]:
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
            s.writer.checkpoint(_checkpoint(s) if rank == 0 else {})
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
        s.writer.epoch(record, _checkpoint(s) if rank == 0 else {}, improved, state["history"], epochs,
                       state["best_val_accuracy"])
        if os.environ.get("INAT_KILL_AFTER_EPOCH") == str(epoch + 1):  # fault injection for the resume test
            os.kill(os.getpid(), signal.SIGKILL)
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
    temperature = _fit_temperature(s, run_dir) if rank == 0 and state["epoch"] > 0 else None
    summary = _summary(s, stop_reason, time.perf_counter() - t_start, temperature)
    s.writer.finish(summary)
    if os.environ.get("INAT_RANK_DIGEST"):  # test hook: each rank's final step and weights
        _write_digest(s, Path(run_dir), rank)
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


def _fit_temperature(s: Setup, run_dir: Path) -> TemperatureChoice:
    """Temperature scaling of the best checkpoint on the validation split (never the test folder).

    The full model runs on the validation images whatever the training input was (cached
    features or prefix views give no logits of the saved model); T is stored in best.pt and
    last.pt, so predict, export, explain and detect report calibrated probabilities.
    """
    from inat.checkpoint import save_checkpoint
    from inat.inference import batched_logits
    from inat.models import model_from_state

    ckpt_dir = run_dir / "checkpoints"
    best = load_checkpoint(ckpt_dir / "best.pt")
    model = model_from_state(best).to(s.device)
    spec = model.spec
    logits = batched_logits(model, np.asarray(s.data.images[s.data.val_idx]), spec.mean, spec.std, s.precision,
                            batch_size=int(s.cfg.train.eval_batch_size), tta_flip=bool(s.cfg.aug.tta_flip),
                            device=s.device, channels_last=False)
    choice = choose_temperature(logits, s.data.labels[s.data.val_idx])  # may keep the raw softmax (T None)
    for name in ("best.pt", "last.pt"):
        state = best if name == "best.pt" else load_checkpoint(ckpt_dir / name)
        state.update(temperature_record(choice))
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, ckpt_dir / name)
    s.writer.say(choice.note)
    return choice


def _summary(s: Setup, stop_reason: str, wall: float, temperature: Optional[TemperatureChoice]) -> Summary:
    from inat.data.balance import imbalance

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
        environment=environment(s.device), config=s.writer.cfg_dict,
        extra={**imbalance(data.labels[data.train_idx], len(data.classes)), **temperature_record(temperature)})


def _write_digest(s: Setup, run_dir: Path, rank: int) -> None:
    import hashlib
    import json

    h = hashlib.sha256()  # parameters only: BN running statistics are rank-local until DDP's next broadcast
    for name, tensor in sorted(s.model.named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    last = s.state["history"][-1] if s.state["history"] else {}
    (run_dir / f"rank{rank}.digest.json").write_text(json.dumps({
        "step": s.state["step"], "sha256": h.hexdigest(), "rebuilds": s.wrapper.rebuilds,
        "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
        "val_images": len(getattr(s.source, "val_labels", ()))}))
