"""The training loop, as named functions: ``load_data``, ``train_one_epoch``, ``evaluate``, ``fit``.

Fast path by default: images come decoded from the uint8 cache (inat.data.cache), batches
are augmented as tensors on the training device, bf16 autocast and channels_last where
the hardware supports them. Every epoch writes ``metrics.csv`` and ``checkpoints/last.pt``;
``summary.json`` is written last, so a folder without it is an unfinished run.
Under ``torchrun`` the loop runs DDP (gloo on CPU, NCCL on GPU); only rank 0 writes.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from inat.checkpoint import load_checkpoint, save_checkpoint
from inat.data.augment import BatchAugment
from inat.data.cache import load_or_build
from inat.data.folder import FolderSplit, scan_train
from inat.data.images import to_float
from inat.data.split import build_split, write_manifest
from inat.errors import InatError
from inat.models import InatModel, ModelSpec, build_from_config
from inat.runs import world, write_json, write_metrics

# Named, separate seeds (STYLE 6): the split has data.split_seed; these derive from `seed`.
SEED_INIT, SEED_ORDER, SEED_AUG, SEED_VIEWS = 0, 1, 2, 3


@dataclass
class TrainData:
    """Decoded images of train/ and the split: ``images[train_idx]`` are trained on."""

    root: Path
    folder: FolderSplit
    images: np.ndarray  # (N, S, S, 3) uint8 memory map
    labels: np.ndarray  # (N,)
    sha1: List[str]
    train_idx: np.ndarray
    val_idx: np.ndarray

    @property
    def classes(self) -> List[str]:
        return list(self.folder.classes)


def resolve_root(data_cfg: Any) -> Path:
    """The dataset root, downloading nature_12K on first use when it is the default root."""
    from inat.data.download import ensure_dataset

    return Path(ensure_dataset(data_cfg))


def load_data(cfg: DictConfig, spec: ModelSpec, root: Path, folder: FolderSplit, progress: bool = True) -> TrainData:
    """Decode train/ once at the model's input size and split it, stratified and seeded."""
    cache = load_or_build(folder.paths, spec.input_size, interpolation=spec.interpolation,
                          crop_pct=float(spec.extra.get("crop_pct", 1.0)), directory=cfg.data.cache_dir,
                          workers=int(cfg.data.workers), label="train/", progress=progress)
    labels = np.asarray(folder.labels)
    train_idx, val_idx = build_split(labels, float(cfg.data.val_fraction), int(cfg.data.split_seed))
    return TrainData(root, folder, cache.images, labels, cache.sha1, train_idx, val_idx)


def pick_device() -> torch.device:
    """The local rank's GPU under torchrun, the first GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CPUs and GPUs that support it, fp16 on GPUs, nothing for 32."""
    precision = str(precision)
    if precision in ("32", "fp32"):
        return torch.autocast(device.type, enabled=False)
    if precision in ("bf16", "bfloat16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16", "fp16"):
        if device.type != "cuda":
            raise InatError("train.precision=16 needs a GPU; use train.precision=bf16 or 32 on the CPU.")
        return torch.autocast("cuda", dtype=torch.float16)
    raise InatError(f"Unknown train.precision '{precision}': valid are 32, bf16, 16.")


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1]: linear warmup, then the schedule."""
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    if schedule == "constant":
        return 1.0
    p = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    if schedule == "onecycle":  # linear anneal to zero after the warmup ramp
        return max(0.0, 1.0 - p)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise InatError(f"Unknown optim.schedule '{schedule}': valid are onecycle, cosine, constant.")


def make_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD; no weight decay on biases and norm weights (1-d parameters)."""
    lr, wd = float(cfg.train.lr), float(cfg.optim.weight_decay)
    if cfg.finetune.strategy != "none":
        from inat.models.freeze import param_groups

        groups = param_groups(model, cfg.finetune, lr, wd)
    else:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": wd, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    for g in groups:
        g["base_lr"] = g["lr"]
    name = cfg.optim.name
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.optim.momentum), nesterov=bool(cfg.optim.nesterov))
    raise InatError(f"Unknown optim.name '{name}': valid are adamw, adam, sgd.")


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, spec: ModelSpec, *, batch_size: int = 256,
                   tta_flip: bool = False, device: torch.device | None = None, precision: str = "bf16",
                   channels_last: bool = True, progress: str | None = None) -> torch.Tensor:
    """Logits (N, classes) in float32 for uint8 (N, S, S, 3) images, averaged with the mirror if asked."""
    from tqdm import tqdm

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=progress or "eval", disable=progress is None, leave=False, mininterval=1.0):
        x = to_float(torch.from_numpy(np.array(images[start:start + batch_size])), spec.mean, spec.std).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(precision, device):
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, spec.num_classes)


def logit_metrics(logits: torch.Tensor, labels: np.ndarray) -> Dict[str, float]:
    """Cross-entropy loss and top-1 accuracy of (N, classes) logits against integer labels."""
    y = torch.as_tensor(labels)
    return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, spec: ModelSpec, cfg: DictConfig,
             device: torch.device) -> Dict[str, float]:
    """Validation loss and accuracy (with test-time flip when the aug config asks for it)."""
    logits = predict_logits(model, images, spec, batch_size=int(cfg.train.eval_batch_size),
                            tta_flip=bool(cfg.aug.tta_flip), device=device, precision=cfg.train.precision,
                            channels_last=bool(cfg.train.channels_last))
    return logit_metrics(logits, labels)


@torch.no_grad()
def _frozen_outputs(fn: Callable[[torch.Tensor], torch.Tensor], data: TrainData, idx: np.ndarray, spec: ModelSpec,
                    cfg: DictConfig, device: torch.device, *, augment: Optional[BatchAugment] = None,
                    gen: Optional[torch.Generator] = None, flip: bool = False, dtype: torch.dtype = torch.float32,
                    desc: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fn`` (a frozen part of the model, in eval mode) applied to the images ``idx`` in batches.

    Plain images, mirrored ones (``flip``) or augmented ones (``augment`` with ``gen``, which
    may also turn labels into soft targets). Returns (outputs stored as ``dtype``, targets).
    """
    from tqdm import tqdm

    outs, targets = [], []
    batch = int(cfg.train.eval_batch_size)
    for start in tqdm(range(0, len(idx), batch), desc=desc, disable=desc is None, leave=False, mininterval=1.0):
        sel = idx[start:start + batch]
        u8 = torch.from_numpy(np.array(data.images[sel])).to(device)
        y = torch.from_numpy(data.labels[sel]).to(device)
        if augment is not None:
            x, y = augment(u8, y, gen)
        else:
            x = to_float(u8, spec.mean, spec.std)
            if flip:
                x = x.flip(3)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(cfg.train.precision, device):
            outs.append(fn(x).to(dtype).cpu())
        targets.append(y.cpu())
    return torch.cat(outs), torch.cat(targets)


@torch.no_grad()
def probe_features(model: InatModel, data: TrainData, spec: ModelSpec, cfg: DictConfig, device: torch.device,
                   progress: bool = True) -> Dict[str, Any]:
    """Penultimate features of every train/ image, computed once (eval mode, no augmentation).

    The linear probe trains only the head, so the frozen backbone's output for an image
    never changes: computing it once turns each epoch into a few matrix products.
    """
    from inat.models.freeze import features_and_head

    backbone_fn, head = features_and_head(model)
    was_training = model.training
    model.eval()
    feats, _ = _frozen_outputs(backbone_fn, data, np.arange(len(data.images)), spec, cfg, device,
                               desc="backbone features (once)" if progress else None)
    model.train(was_training)
    return {"features": feats, "head": head}


@torch.no_grad()
def prefix_views(model: InatModel, data: TrainData, spec: ModelSpec, cfg: DictConfig, device: torch.device,
                 augment: BatchAugment, progress: bool = True) -> Dict[str, Any]:
    """Partial fine-tuning's fast path: the frozen first k groups run once per cached view.

    The frozen prefix (eval mode, ImageNet BN statistics) is a fixed function of its input,
    so its output for ``finetune.cache_views`` augmented views of each training image (and
    for the plain and, with TTA, mirrored validation images) is computed once and stored in
    bf16; every epoch then trains only the suffix, on a randomly drawn view per image.
    Views are drawn from their own seeded generators, so a resumed run rebuilds the same cache.
    """
    from inat.models.freeze import split_at

    ft = cfg.finetune
    if ft.bn == "train_all":
        raise InatError("finetune.cache_views needs the frozen groups' BatchNorm frozen (finetune.bn=freeze_frozen "
                        "or freeze_all): with bn=train_all their statistics change and no output can be cached.")
    prefix, suffix = split_at(model, int(ft.k))
    was_training = model.training
    model.eval()
    views = int(ft.cache_views)
    train_idx, val_idx = data.train_idx, data.val_idx
    probe, _ = _frozen_outputs(prefix, data, train_idx[:2], spec, cfg, device, dtype=torch.bfloat16)
    per_item = probe[0].numel() * 2
    need = per_item * (views * len(train_idx) + 2 * len(val_idx))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total / 2:
        raise InatError(f"finetune.cache_views={views} would keep {need / 2**30:.1f} GB of frozen-prefix outputs "
                        f"({tuple(probe.shape[1:])} per image), more than half of this machine's {total / 2**30:.0f} GB; "
                        f"use fewer views or a larger finetune.k.")
    train_x, train_y = [], []
    for v in range(views):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + SEED_VIEWS + 7919 * v)
        x, y = _frozen_outputs(prefix, data, train_idx, spec, cfg, device, augment=augment, gen=gen,
                               dtype=torch.bfloat16, desc=f"frozen prefix, view {v + 1}/{views}" if progress else None)
        train_x.append(x)
        train_y.append(y)
    val_x, _ = _frozen_outputs(prefix, data, val_idx, spec, cfg, device, dtype=torch.bfloat16)
    val_flip = None
    if cfg.aug.tta_flip:
        val_flip, _ = _frozen_outputs(prefix, data, val_idx, spec, cfg, device, flip=True, dtype=torch.bfloat16)
    model.train(was_training)
    position = np.full(len(data.images), -1, dtype=np.int64)
    position[train_idx] = np.arange(len(train_idx))
    return {"train_x": torch.stack(train_x), "train_y": torch.stack(train_y), "position": position,
            "val_x": val_x, "val_flip": val_flip, "suffix": suffix, "bytes": need}


@torch.no_grad()
def evaluate_suffix(suffix: nn.Module, model: nn.Module, cached: torch.Tensor, flipped: Optional[torch.Tensor],
                    labels: np.ndarray, cfg: DictConfig, device: torch.device) -> Dict[str, float]:
    """Validation loss and accuracy of the trained suffix on cached prefix outputs (TTA: mean with the mirror)."""
    was_training = model.training
    model.eval()
    out = []
    batch = int(cfg.train.eval_batch_size)
    for start in range(0, len(cached), batch):
        with autocast_context(cfg.train.precision, device):
            logits = suffix(cached[start:start + batch].to(device).float()).float()
            if flipped is not None:
                logits = (logits + suffix(flipped[start:start + batch].to(device).float()).float()) / 2
        out.append(logits.cpu())
    model.train(was_training)
    return logit_metrics(torch.cat(out), labels)


@torch.no_grad()
def evaluate_features(head: nn.Module, features: torch.Tensor, labels: np.ndarray) -> Dict[str, float]:
    """Validation loss and accuracy of a head on cached features."""
    head.eval()
    logits = head(features.to(next(head.parameters()).device)).float().cpu()
    head.train()
    return logit_metrics(logits, labels)


def train_one_epoch(model: nn.Module, step_model: nn.Module, optimizer: torch.optim.Optimizer, data: TrainData,
                    cfg: DictConfig, spec: ModelSpec, epoch: int, state: Dict[str, Any], device: torch.device,
                    make_batch: Callable, ema: Optional[nn.Module], budget_s: float, total_steps: int) -> Dict[str, float]:
    """One pass over this rank's share of a seeded permutation of the training images.

    ``make_batch(idx, gen) -> (inputs, targets)`` turns sorted image indices into a batch:
    augmented images normally, cached backbone features for the linear-probe fast path.
    """
    from tqdm import tqdm

    rank, world_size = world()
    bs = int(cfg.train.batch_size)
    order = torch.Generator().manual_seed(cfg.seed * 1000 + SEED_ORDER + 7919 * epoch)
    perm = data.train_idx[torch.randperm(len(data.train_idx), generator=order).numpy()]
    per_rank = len(perm) // world_size
    perm = perm[rank * per_rank:(rank + 1) * per_rank]  # equal shares keep DDP ranks in step
    n_batches = len(perm) // bs if len(perm) >= bs else 1  # drop the ragged last batch (BN dislikes tiny ones)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + SEED_AUG + 7919 * epoch + 104729 * rank)
    warmup = float(cfg.optim.warmup_epochs) / max(1, int(cfg.train.epochs))
    smoothing = float(cfg.optim.label_smoothing)
    seen = correct = 0
    loss_sum = 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=rank != 0,
               mininterval=1.0)
    for b in bar:
        idx = np.sort(perm[b * bs:(b + 1) * bs])  # sorted reads are kinder to the memory map
        x, target = make_batch(idx, gen)
        y = target
        if cfg.train.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        progress = state["step"] / max(1, total_steps)
        if budget_s > 0:
            progress = max(progress, (state["train_seconds"] + time.perf_counter() - t0) / budget_s)
        factor = lr_factor(min(progress, 1.0), warmup, cfg.optim.schedule)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        with autocast_context(cfg.train.precision, device):
            logits = step_model(x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), float(cfg.optim.grad_clip))
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        state["step"] += 1
        hard = target.argmax(1) if target.ndim == 2 else target
        correct += int((logits.argmax(1) == hard).sum())
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        if budget_s > 0 and state["train_seconds"] + time.perf_counter() - t0 >= budget_s:
            break
        if rank == 0 and b % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    dt = time.perf_counter() - t0
    state["train_seconds"] += dt
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"], "images_per_sec": seen * world_size / max(dt, 1e-9)}


def environment(device: torch.device) -> Dict[str, Any]:
    """Versions and hardware behind a run's numbers (for the report's provenance block)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "host": platform.node(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _resolved(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def _comparable(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    # Keys allowed to differ between the first run and its resumption.
    skip = {"resume", "ckpt", "wandb", "mode", "explain", "report", "predict", "export", "detect", "sweep"}
    return {k: v for k, v in cfg_dict.items() if k not in skip}


def _start_wandb(cfg: DictConfig, run_dir: Path):
    mode = cfg.wandb.mode
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
    try:
        return wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, dir=str(run_dir), mode=mode,
                          config=_resolved(cfg), name=run_dir.name, reinit="finish_previous")
    except Exception as err:  # tracking must never kill a training run
        print(f"wandb could not start ({type(err).__name__}: {err}); logging to metrics.csv only.", flush=True)
        return None


def fit(cfg: DictConfig, run_dir: Path,
        epoch_callback: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None) -> Dict[str, Any]:
    """Train with the composed config, writing the run folder; returns the summary dict.

    ``epoch_callback(record)`` runs after each epoch's checkpoint; a non-empty string it
    returns stops training with ``stop_reason = "pruned: <reason>"`` (sweeps use it to
    stop weak trials early without this module knowing about sweeps).
    """
    rank, world_size = world()
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if int(cfg.train.threads) > 0:
        torch.set_num_threads(int(cfg.train.threads))
    device = pick_device()
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    is_main = rank == 0

    root = resolve_root(cfg.data)
    folder = scan_train(root)
    torch.manual_seed(cfg.seed * 1000 + SEED_INIT)
    model: InatModel = build_from_config(cfg, len(folder.classes))
    spec = model.spec
    if cfg.finetune.strategy != "none":
        from inat.models.freeze import setup_finetune

        setup_finetune(model, cfg.finetune)
    data = load_data(cfg, spec, root, folder, progress=is_main)
    if is_main:
        write_manifest(run_dir / "split.json", root, folder.classes, folder.paths, folder.labels, data.sha1,
                       data.train_idx, data.val_idx, int(cfg.data.split_seed), float(cfg.data.val_fraction))
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    ema = None
    if float(cfg.train.ema) > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(cfg.train.ema)), use_buffers=True)

    state: Dict[str, Any] = {"epoch": 0, "step": 0, "train_seconds": 0.0, "best_val_accuracy": -1.0,
                             "best_epoch": 0, "bad_epochs": 0, "history": []}
    cfg_dict = _resolved(cfg)
    if cfg.resume:
        last = ckpt_dir / "last.pt"
        if not last.is_file():
            raise InatError(f"resume=true but '{last}' does not exist; pass the run folder with hydra.run.dir=RUN_DIR.")
        saved = load_checkpoint(last)
        if _comparable(saved["config"]) != _comparable(cfg_dict):
            raise InatError(f"resume=true with a config that differs from the one in '{last}'; resume with the same overrides.")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None and saved.get("ema_full"):
            ema.load_state_dict(saved["ema_full"])
        state.update(saved["state"])
        torch.set_rng_state(saved["rng"]["torch"])
        (run_dir / "summary.json").unlink(missing_ok=True)
        if is_main:
            print(f"Resuming from epoch {state['epoch']} of {last}", flush=True)

    step_model: nn.Module = model
    if world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        step_model = torch.compile(step_model)
    augment = BatchAugment(cfg.aug, spec.mean, spec.std, spec.num_classes)

    def image_batch(idx: np.ndarray, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.array(data.images[idx])).to(device)  # (B, S, S, 3) uint8
        return augment(x, torch.from_numpy(data.labels[idx]).to(device), gen)

    make_batch, probe, views, ema_suffix = image_batch, None, None, None
    t_cache = time.perf_counter()
    if cfg.finetune.strategy == "linear_probe" and cfg.finetune.cached_features and world_size == 1:
        probe = probe_features(model, data, spec, cfg, device, progress=is_main)
        step_model = probe["head"]

        def make_batch(idx: np.ndarray, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
            return probe["features"][idx].to(device), torch.from_numpy(data.labels[idx]).to(device)
    elif cfg.finetune.strategy == "partial" and int(cfg.finetune.cache_views) > 0:
        if world_size > 1:
            raise InatError("finetune.cache_views works in one process; set finetune.cache_views=0 under torchrun.")
        views = prefix_views(model, data, spec, cfg, device, augment, progress=is_main)
        step_model = views["suffix"]
        if ema is not None:
            from inat.models.freeze import split_at

            ema_suffix = split_at(ema.module, int(cfg.finetune.k), check=False)[1]

        def make_batch(idx: np.ndarray, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
            pos = torch.from_numpy(views["position"][idx])
            pick = torch.randint(views["train_x"].shape[0], (len(idx),), generator=gen)
            return views["train_x"][pick, pos].to(device).float(), views["train_y"][pick, pos].to(device)
    cache_seconds = time.perf_counter() - t_cache
    if is_main and (probe is not None or views is not None):
        size = (probe["features"].numel() * 4) if probe is not None else views["bytes"]
        print(f"frozen outputs cached once in {cache_seconds:.0f} s ({size / 2**20:.0f} MiB)", flush=True)
    epochs = int(cfg.train.epochs)
    bs = int(cfg.train.batch_size)
    total_steps = epochs * max(1, (len(data.train_idx) // world_size) // bs)
    budget_s = float(cfg.train.max_minutes) * 60
    run = _start_wandb(cfg, run_dir) if is_main else None
    val_images, val_labels = data.images[data.val_idx], data.labels[data.val_idx]
    if is_main:
        print(f"{spec.name}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(folder.classes)} classes, "
              f"{len(data.train_idx)} train / {len(data.val_idx)} val images at {spec.input_size}px on {device}", flush=True)
    stop_reason = "epochs"
    for epoch in range(state["epoch"], epochs):
        if cfg.finetune.strategy != "none":
            from inat.models.freeze import on_epoch_start, set_train_mode

            on_epoch_start(model, cfg.finetune, epoch)
            set_train_mode(model, cfg.finetune)
        else:
            model.train()
        row = train_one_epoch(model, step_model, optimizer, data, cfg, spec, epoch, state, device, make_batch, ema,
                              budget_s, total_steps)
        eval_model = ema.module if ema is not None else model
        if probe is not None:
            val = evaluate_features(eval_model.head(), probe["features"][data.val_idx], val_labels)
        elif views is not None:
            val = evaluate_suffix(ema_suffix if ema is not None else views["suffix"], eval_model, views["val_x"],
                                  views["val_flip"], val_labels, cfg, device)
        else:
            val = evaluate(eval_model, val_images, val_labels, spec, cfg, device)
        state["epoch"] = epoch + 1
        record = {"epoch": epoch + 1, "train_loss": round(row["train_loss"], 6), "train_accuracy": round(row["train_accuracy"], 6),
                  "val_loss": round(val["loss"], 6), "val_accuracy": round(val["accuracy"], 6), "lr": row["lr"],
                  "images_per_sec": round(row["images_per_sec"], 1), "seconds": round(state["train_seconds"], 2)}
        state["history"].append(record)
        improved = val["accuracy"] > state["best_val_accuracy"]
        if improved:
            state["best_val_accuracy"], state["best_epoch"], state["bad_epochs"] = val["accuracy"], epoch + 1, 0
        else:
            state["bad_epochs"] += 1
        if is_main:
            ckpt = {"config": cfg_dict, "classes": data.classes, "spec": spec.to_dict(), "model": model.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else None,
                    "ema_full": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(), "state": state, "rng": {"torch": torch.get_rng_state()},
                    "split_sha1": {"train": [data.sha1[i] for i in data.train_idx], "val": [data.sha1[i] for i in data.val_idx]}}
            save_checkpoint(ckpt, ckpt_dir / "last.pt")
            if improved:
                save_checkpoint(ckpt, ckpt_dir / "best.pt")
            write_metrics(run_dir / "metrics.csv", state["history"])
            if run is not None:
                run.log(record, step=epoch + 1)
            print(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  train {record['train_accuracy']:.1%}  "
                  f"val {record['val_accuracy']:.1%} (best {state['best_val_accuracy']:.1%})  "
                  f"{record['images_per_sec']:.0f} img/s  {record['seconds']:.0f}s", flush=True)
        if os.environ.get("INAT_KILL_AFTER_EPOCH") == str(epoch + 1):  # fault injection for the resume test
            os.kill(os.getpid(), signal.SIGKILL)
        reason = epoch_callback(record) if epoch_callback is not None else None
        if reason:
            stop_reason = f"pruned: {reason}"
            if is_main:
                print(f"stopped early: {reason}", flush=True)
            break
        if cfg.train.early_stopping > 0 and state["bad_epochs"] >= int(cfg.train.early_stopping):
            stop_reason = "early_stopping"
            break
        if budget_s > 0 and state["train_seconds"] >= budget_s:
            stop_reason = "budget"
            break
    hist = state["history"]
    summary = {
        "best_val_accuracy": state["best_val_accuracy"], "val_accuracy": hist[-1]["val_accuracy"] if hist else None,
        "best_epoch": state["best_epoch"], "epochs": state["epoch"], "stop_reason": stop_reason,
        "train_images_per_sec": round(sum(h["images_per_sec"] for h in hist) / max(1, len(hist)), 1),
        "train_seconds": round(state["train_seconds"], 2), "wall_seconds": round(time.perf_counter() - t_start, 2),
        "cache_seconds": round(cache_seconds, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "model": spec.name, "classes": data.classes,
        "n_train": int(len(data.train_idx)), "n_val": int(len(data.val_idx)), "device": str(device),
        "world_size": world_size, "environment": environment(device), "config": cfg_dict,
    }
    if is_main:
        write_json(run_dir / "summary.json", summary)
        if run is not None:
            run.summary.update({k: v for k, v in summary.items() if k != "config"})
            run.finish()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
