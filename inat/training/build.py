"""Building a training run: the recipe, device, backends, data, model, optimizer, input source and writer.

``build(cfg, run_dir)`` is the only place a training run reads the config: it turns it into
a :class:`Recipe` (the typed values the step, the epoch loop, the stop rule and the finish
read) and the objects one run holds, a :class:`Setup` (resumed from ``last.pt`` when asked,
checked before anything is decoded or rewritten). ``fit`` in ``inat.training.loop`` runs its
epochs on the Setup and ``inat.training.finish`` closes it; neither sees the config again.
``+mode=lr_find`` trains the same model on the same data with the same optimizer, built by
:func:`open_device` and :func:`build_trainable` without the run folder's files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from inat.config import FinetuneConfig
from inat.data.balance import class_weights
from inat.data.dataset import describe_roles, scan_train_set
from inat.data.split import write_manifest
from inat.errors import InatError
from inat.inference import Precision, pick_device, process_precision
from inat.models import InatModel, build_from_config
from inat.models.freeze import setup_finetune
from inat.run_folder import SPLIT
from inat.runs import world
from inat.training import distributed, resume
from inat.training.collectives import sum_over_ranks
from inat.training.data import SEED_INIT, TrainData, load_data, resolve_root
from inat.training.ema import ModelEMA
from inat.training.optim import check_schedule, make_optimizer
from inat.training.resize import ResizeChoice, ResizeSchedule, choose as choose_resize
from inat.training.sources import FeatureSource, ImageSource, PrefixViewSource
from inat.training.writer import RunWriter


@dataclass(frozen=True)
class Recipe:
    """What the step, the epoch loop, the stop rule and the finish read, typed, taken from the config once."""

    epochs: int
    batch_size: int
    eval_batch_size: int  # validation, and the finish's calibration on the validation split
    seed: int  # the data order's and the augmentation's streams derive from it (inat.training.data)
    balanced_sampler: bool
    warmup: float  # the schedule's warmup as a fraction of the run: optim.warmup_epochs / train.epochs
    schedule: str
    grad_clip: float  # 0 = off
    label_smoothing: float
    class_weights: str  # none | auto
    log_every: int  # progress bar refresh in steps (train.log_every, 0 meaning 50)
    early_stopping: int  # patience in epochs on val accuracy; 0 = off
    budget_seconds: float  # train.max_minutes in seconds; 0 = the epochs decide
    finetune: FinetuneConfig  # every epoch: gradual unfreezing and the BatchNorm policy
    tta_flip: bool  # the temperature is fitted on the logits test mode scores with
    target_precision: float  # the rejection threshold's precision on the validation split

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Recipe":
        train, optim = cfg.train, cfg.optim
        return cls(epochs=train.epochs, batch_size=train.batch_size, eval_batch_size=train.eval_batch_size,
                   seed=cfg.seed, balanced_sampler=train.balanced_sampler,
                   warmup=optim.warmup_epochs / max(1, train.epochs), schedule=optim.schedule,
                   grad_clip=optim.grad_clip, label_smoothing=optim.label_smoothing,
                   class_weights=train.class_weights, log_every=train.log_every or 50,
                   early_stopping=train.early_stopping, budget_seconds=train.max_minutes * 60,
                   finetune=FinetuneConfig(**OmegaConf.to_container(cfg.finetune, resolve=True)),
                   tta_flip=cfg.aug.tta_flip, target_precision=cfg.predict.target_precision)


@dataclass
class Setup:
    """Everything one training run holds, built by :func:`build`. No config: the step reads :attr:`recipe`."""

    recipe: Recipe
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
    resize: Optional[ResizeSchedule] = None  # progressive resizing; None: the input size throughout
    resize_reason: str = ""  # why resize is what it is (train.resize_start, auto's choice)
    cache_seconds: float = 0.0
    state: Dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "step": 0, "train_seconds": 0.0,
                                                           "best_val_accuracy": -1.0, "best_epoch": 0,
                                                           "bad_epochs": 0, "history": []})


@dataclass
class Trainable:
    """The model, its data and its optimizer on the device: what a training run and lr_find both train."""

    root: Path
    model: InatModel
    data: TrainData
    optimizer: torch.optim.Optimizer
    channels_last: bool
    resize: ResizeChoice  # progressive resizing (train.resize_start): its schedule (None: off) and why


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


def loss_fn(recipe: Recipe, weight: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with the recipe's label smoothing and, with ``train.class_weights=auto``, class weights."""
    smoothing = recipe.label_smoothing
    return lambda logits, target: F.cross_entropy(logits.float(), target, label_smoothing=smoothing, weight=weight)


def class_weight_tensor(s: Setup) -> Optional[torch.Tensor]:
    w = class_weights(s.data.labels[s.data.train_idx], s.model.spec.num_classes, s.recipe.class_weights)
    return None if w is None else w.to(s.device)


def open_device(threads: int) -> torch.device:
    """This process's device, with ``train.threads`` intra-op threads (0: torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
    return pick_device()


def build_trainable(cfg: DictConfig, device: torch.device, *, progress: bool) -> Trainable:
    """Data, model (seeded, fine-tuning set up), its place on the device and its optimizer.

    Writes nothing: the split manifest, the writer's files and resuming are :func:`build`'s.
    The train folder is scanned before the model is built (the head's width is its number of
    classes) and decoded after, into the size the model's spec asks for.
    """
    root = resolve_root(cfg.data)
    folder = scan_train_set(cfg.data, root)
    torch.manual_seed(cfg.seed * 1000 + SEED_INIT)
    model = build_from_config(cfg, len(folder.classes))
    ft = cfg.finetune
    resize = choose_resize(cfg.train, model.spec.input_size, device_type=device.type,  # before any image is decoded
                           scratch=cfg.model.name == "scratch",
                           cached=((ft.strategy == "linear_probe" and ft.cached_features) or
                                   (ft.strategy == "partial" and ft.cache_views > 0)))
    if cfg.finetune.strategy != "none":
        setup_finetune(model, cfg.finetune)
    data = load_data(cfg.data, model.spec, root, folder, progress=progress)
    if world()[1] > 1 and cfg.train.sync_bn:
        model = distributed.convert_sync_bn(model)
    model.to(device)
    if cfg.train.channels_last:  # the memory layout the step runs in
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.train, cfg.optim, cfg.finetune, device)
    return Trainable(root, model, data, optimizer, cfg.train.channels_last, resize)


def build(cfg: DictConfig, run_dir: Path) -> Setup:
    """The recipe and every object of a run: device, precision, data, model, optimizer, source, writer.

    Resumed from ``last.pt`` when ``resume`` asks: the checkpoint and its config are checked
    before any image is decoded, the split before ``split.json`` is rewritten.
    """
    run_dir = Path(run_dir)
    rank, world_size = world()
    is_main = rank == 0
    device = open_device(cfg.train.threads)
    distributed.init(device)
    check_same_run_dir(run_dir, device)
    configure_backends(device, cfg.train.deterministic)
    check_schedule(cfg.optim.schedule)
    precision = process_precision(cfg.train.precision, device, announce=is_main)
    config = OmegaConf.to_container(cfg, resolve=True)
    saved = resume.load_last(run_dir, config, cfg.resume)
    if saved is None and cfg.resume == "auto" and is_main:
        print(f"resume=auto: run folder '{run_dir}' holds no run yet; training from the start.", flush=True)
    t = build_trainable(cfg, device, progress=is_main)
    data = t.data
    if saved is not None:  # before split.json is rewritten: a refused resume leaves the run folder as it was
        resume.check_same_split(saved, data, run_dir)
    if is_main:
        write_manifest(run_dir / SPLIT, t.root, data.folder.classes, data.folder.paths, data.folder.labels,
                       data.sha1, data.train_idx, data.val_idx, cfg.data.split_seed, cfg.data.val_fraction,
                       given_val=data.given_val)
    ema = ModelEMA(t.model, cfg.train.ema) if cfg.train.ema > 0 else None
    writer = RunWriter(run_dir, cfg.wandb, config, is_main, wandb_id=saved.get("wandb_id") if saved else None)
    s = Setup(recipe=Recipe.from_config(cfg), device=device, precision=precision, model=t.model, data=data,
              source=None, optimizer=t.optimizer, scaler=precision.grad_scaler(), wrapper=None, writer=writer, ema=ema,
              resize=t.resize.schedule, resize_reason=t.resize.reason)
    if saved is not None:
        resume.restore(s, run_dir, saved, cfg.resume)
    t_cache = time.perf_counter()
    s.source = _source(s, cfg.aug, cfg.finetune, t.channels_last, is_main)
    s.cache_seconds = time.perf_counter() - t_cache
    if not isinstance(s.source, ImageSource):
        s.writer.say(f"frozen outputs cached once in {s.cache_seconds:.0f} s ({s.source.bytes / 2**20:.0f} MiB): "
                     f"{s.source.kind}")
    # The step trains source.module: the model, or only its head (cached features) or suffix (prefix views).
    s.wrapper = distributed.Wrapper(s.source.module, device, compile=cfg.train.compile)
    if world_size > 1:
        shard_validation(s.source, rank, world_size)
    spec = s.model.spec
    s.writer.say(f"{spec.name}: {sum(p.numel() for p in s.model.parameters()):,} parameters, {len(data.classes)} "
                 f"classes, {len(data.train_idx)} train / {len(data.val_idx)} val images at {spec.input_size}px "
                 f"on {device}, input: {s.source.kind}")
    s.writer.say(f"data: {describe_roles(cfg.data, data.root)}")
    s.writer.say(f"progressive resizing: {s.resize_reason}")
    return s


# The name before ``build``, which the package exports (``inat.training.build`` is this module): tests,
# experiments/bench/variants.py and older tools call it.
setup = build


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


def _source(s: Setup, aug: Any, finetune: Any, channels_last: bool, progress: bool):
    """What the step reads: augmented images, the linear probe's cached features, or partial's prefix views."""
    common = dict(channels_last=channels_last, eval_batch_size=s.recipe.eval_batch_size)
    _, world_size = world()
    if finetune.strategy == "linear_probe" and finetune.cached_features:
        if world_size == 1:
            return FeatureSource(s.model, s.data, s.model.spec, s.precision, s.device, progress=progress, **common)
        s.writer.say("finetune.cached_features works in one process: under torchrun the linear probe runs the "
                     "frozen backbone on the augmented images every step instead (slower).")
    if finetune.strategy == "partial" and finetune.cache_views > 0:
        if world_size > 1:
            raise InatError("finetune.cache_views works in one process; set finetune.cache_views=0 under torchrun.")
        return PrefixViewSource(s.model, s.data, s.model.spec, aug, finetune, s.precision, s.device,
                                seed=s.recipe.seed, tta_flip=aug.tta_flip, progress=progress, **common)
    return ImageSource(s.model, s.data, s.model.spec, aug, s.precision, s.device, tta_flip=aug.tta_flip,
                       **common)
