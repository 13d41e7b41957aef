"""Every fixed set of names a config key can take, written once.

The schema's check (``config.CHOICES``) and the code that maps each name to what it does
(``models.scratch.make_activation``, ``training.optim``, ``models.freeze``, ``explain``,
``export``, ``inference``'s precision policy) read the same tuple from here, so a choice added
to one cannot be missing from the other (the lists had drifted: the config refused
``train.precision=half``, which the precision policy took). A leaf: it imports nothing.
"""
from __future__ import annotations

from typing import Dict, Tuple

ACTIVATIONS: Tuple[str, ...] = ("relu", "gelu", "silu", "mish", "elu", "leaky_relu", "selu", "tanh", "sigmoid",
                                "hardswish")
FILTER_ORGANISATIONS: Tuple[str, ...] = ("same", "doubling", "halving", "custom")
DROPOUT_WHERE: Tuple[str, ...] = ("dense", "conv", "both")
FINETUNE_STRATEGIES: Tuple[str, ...] = ("none", "linear_probe", "partial", "gradual", "full")
BN_POLICIES: Tuple[str, ...] = ("freeze_frozen", "train_all", "freeze_all")
OPTIMIZERS: Tuple[str, ...] = ("adamw", "adam", "sgd")
SCHEDULES: Tuple[str, ...] = ("onecycle", "cosine", "constant")
PRECISIONS: Tuple[str, ...] = ("auto", "32", "bf16", "16")
# Other spellings of a precision, accepted on the command line and stored as the canonical name.
PRECISION_ALIASES: Dict[str, str] = {"fp32": "32", "float32": "32", "bfloat16": "bf16", "fp16": "16", "float16": "16",
                                     "half": "16"}
WANDB_MODES: Tuple[str, ...] = ("online", "offline", "disabled")
CLASS_WEIGHTS: Tuple[str, ...] = ("none", "auto")
EXPLAIN_FIGURES: Tuple[str, ...] = ("grid", "filters", "guided_backprop", "confusion", "gradcam")
CAM_METHODS: Tuple[str, ...] = ("gradcam", "gradcam++")
GRID_PICKS: Tuple[str, ...] = ("random", "confident", "mistakes")
EXPORT_FORMATS: Tuple[str, ...] = ("onnx", "torchscript")
ONNX_EXPORTERS: Tuple[str, ...] = ("legacy", "dynamo")
# export.quantize: none = fp32 only; dynamic = int8 weights, activations quantized per batch at run time;
# static = int8 weights and activations, activation ranges calibrated on training-split images.
QUANTIZE_MODES: Tuple[str, ...] = ("none", "dynamic", "static")
# The values of a manifest's split column (inat.data.manifest); a row without one trains.
MANIFEST_SPLITS: Tuple[str, ...] = ("train", "val", "test")
