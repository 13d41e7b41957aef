"""Building a training run: device, backends, data, model, optimizer, input source and writer.

``setup(cfg, run_dir)`` assembles everything one run holds into a :class:`Setup` (resumed from
``last.pt`` when asked, checked before anything is decoded or rewritten); ``fit`` in
``inat.training.loop`` runs its epochs and ``inat.training.finish`` closes it.
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

from inat.data.dataset import scan_train_set
from inat.data.split import write_manifest
from inat.errors import InatError
from inat.inference import Precision, pick_device, process_precision
from inat.models import InatModel, build_from_config
from inat.run_folder import SPLIT
from inat.runs import world
from inat.training import distributed, resume
from inat.training.collectives import sum_over_ranks
from inat.training.data import SEED_INIT, TrainData, load_data, resolve_root
from inat.training.ema import ModelEMA
from inat.training.optim import check_schedule, make_optimizer
from inat.training.resize import ResizeSchedule, schedule_from
from inat.training.sources import FeatureSource, ImageSource, PrefixViewSource
from inat.training.writer import RunWriter


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
    resize: Optional[ResizeSchedule] = None  # progressive resizing; None: the input size throughout
    cache_seconds: float = 0.0
    state: Dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "step": 0, "train_seconds": 0.0,
                                                           "best_val_accuracy": -1.0, "best_epoch": 0,
                                                           "bad_epochs": 0, "history": []})


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
    folder = scan_train_set(cfg.data, root)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    saved = resume.load_last(Path(run_dir), cfg_dict, cfg.resume)
    if saved is None and cfg.resume == "auto" and is_main:
        print(f"resume=auto: run folder '{run_dir}' holds no run yet; training from the start.", flush=True)
    torch.manual_seed(cfg.seed * 1000 + SEED_INIT)
    model: InatModel = build_from_config(cfg, len(folder.classes))
    spec = model.spec
    resize = schedule_from(cfg.train, spec.input_size)  # checked before any image is decoded
    ft = cfg.finetune
    if resize is not None and ((ft.strategy == "linear_probe" and ft.cached_features) or
                               (ft.strategy == "partial" and int(ft.cache_views) > 0)):
        raise InatError(f"train.resize_start={resize.start} resizes the training images, but this run trains on "
                        f"cached backbone outputs: set train.resize_start=0, or finetune.cached_features=false / "
                        f"finetune.cache_views=0 to train on images.")
    if cfg.finetune.strategy != "none":
        from inat.models.freeze import setup_finetune

        setup_finetune(model, cfg.finetune)
    data = load_data(cfg.data, spec, root, folder, progress=is_main)
    if saved is not None:  # before split.json is rewritten: a refused resume leaves the run folder as it was
        resume.check_same_split(saved, data, Path(run_dir))
    if is_main:
        write_manifest(Path(run_dir) / SPLIT, root, data.folder.classes, data.folder.paths, data.folder.labels,
                       data.sha1, data.train_idx, data.val_idx, int(cfg.data.split_seed), float(cfg.data.val_fraction),
                       given_val=data.given_val)
    if world_size > 1 and cfg.train.sync_bn:
        model = distributed.convert_sync_bn(model)
    model.to(device)
    channels_last = bool(cfg.train.channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.train, cfg.optim, cfg.finetune, device)
    ema = ModelEMA(model, float(cfg.train.ema)) if float(cfg.train.ema) > 0 else None
    s = Setup(cfg, device, precision, model, data, None, optimizer, precision.grad_scaler(), None,
              RunWriter(run_dir, cfg, cfg_dict, is_main, wandb_id=saved.get("wandb_id") if saved else None), ema,
              resize)
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
