"""The one place that turns pixels into logits: device, precision policy, eval mode, batching.

Validation, test, predict, explain, detect's species namer, export's parity check and the
frozen-feature caches all call :func:`batched_logits` (or :func:`forward_batches` for a part
of a model) with a :class:`Precision` chosen once per process by :func:`choose_precision`.

The precision policy is decided from what the hardware does natively, never from the machine
a default was tuned on: bf16 autocast is fast only where the CPU has AVX512-BF16 or AMX, or
the GPU has compute capability 8.0 or newer; elsewhere it is emulated and several times
slower than fp32 (measured on an AVX2 CPU: 0.2x). Older GPUs with fast fp16 (Volta, Turing
and the P100) get fp16 with a GradScaler; Pascal's 6.1 parts (GTX 10xx, P4, P40) compute fp16
at a small fraction of their fp32 rate, so they stay fp32.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from inat.choices import PRECISION_ALIASES, PRECISIONS
from inat.data.images import decode_image, fit_image
from inat.errors import InatError
from inat.machine import cpu_features

VALID_PRECISIONS, _ALIASES = PRECISIONS, PRECISION_ALIASES


def pick_device() -> torch.device:
    """The local rank's GPU under torchrun, the first GPU, else the CPU.

    The index wraps around the visible GPUs: a scheduler that shows each task only its own GPU
    (SLURM ``--gpus-per-task=1``, CUDA_VISIBLE_DEVICES per rank) gives local rank 1 one device, cuda:0.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def fast_fp16(major: int, minor: int) -> bool:
    """True where fp16 arithmetic is at least as fast as fp32: compute capability 7.0+, and 6.0 (the P100)."""
    return major >= 7 or (major, minor) == (6, 0)


# oneDNN ISA caps (DNNL_MAX_CPU_ISA) below the first with bf16 instructions: with one of these set,
# oneDNN emulates bf16 convolutions even on a CPU that has AVX512-BF16 or AMX.
NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX), not by emulation.

    The hardware is not enough: a process that caps oneDNN below bf16 (``DNNL_MAX_CPU_ISA=AVX2``,
    as done to approximate an AVX2 machine) would run every bf16 convolution emulated.
    """
    if os.environ.get("DNNL_MAX_CPU_ISA", "").upper() in NO_BF16_ISAS:
        return False
    cpu = torch.cpu  # torch >= 2.3 exposes cpuinfo's answers here
    if hasattr(cpu, "_is_avx512_bf16_supported"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    features = cpu_features()  # older torch: the kernel's flags
    return "avx512_bf16" in features or "amx_bf16" in features


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


@dataclass(frozen=True)
class Precision:
    """The autocast policy of a process: ``name`` in 32|bf16|16, why, and whether fp16 needs a scaler."""

    name: str
    reason: str
    device_type: str = "cpu"

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[self.name]

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.name == "16"

    def autocast(self):
        """The autocast context for this policy (disabled for fp32)."""
        if self.dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """A GradScaler, enabled only when the policy is fp16."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)

    def to_dict(self) -> dict:
        return {"precision": self.name, "precision_reason": self.reason}


def normalise_precision_name(requested: object) -> str:
    """``train.precision`` as one of auto|32|bf16|16 (Hydra may hand over the int 32 or 16)."""
    name = str(requested).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in VALID_PRECISIONS:
        raise InatError(f"Unknown train.precision '{requested}': valid are {', '.join(VALID_PRECISIONS)}.")
    return name


def choose_precision(requested: object, device: torch.device) -> Precision:
    """Decide the precision for ``device``: ``auto`` follows the hardware; explicit choices are kept.

    auto: bf16 on CUDA with compute capability >= 8.0 and on CPUs with native bf16; fp16 with a
    GradScaler on older CUDA GPUs with fast fp16 (:func:`fast_fp16`); fp32 everywhere else. An
    explicit bf16/16 that the hardware only emulates (or runs slowly) is honoured with a one-line
    warning on stderr.
    """
    name = normalise_precision_name(requested)
    dev = device.type
    if dev == "cuda":
        major, minor = cuda_capability(device)
        native = {"32": True, "bf16": major >= 8, "16": fast_fp16(major, minor)}
        where = f"CUDA compute capability {major}.{minor}"
        if name == "auto":
            if major >= 8:
                return Precision("bf16", f"auto: {where} has native bf16", dev)
            if native["16"]:
                return Precision("16", f"auto: {where} has fp16 but no native bf16 (fp16 with GradScaler)", dev)
            return Precision("32", f"auto: {where} has no fast half precision", dev)
    else:
        has_bf16 = cpu_has_native_bf16()
        capability = torch.backends.cpu.get_cpu_capability()
        cap = os.environ.get("DNNL_MAX_CPU_ISA", "").upper()
        lacks = f"oneDNN capped at {cap}" if cap in NO_BF16_ISAS else "no AVX512-BF16/AMX"
        where = f"CPU ({capability}, {'native bf16' if has_bf16 else lacks})"
        native = {"32": True, "bf16": has_bf16, "16": False}
        if name == "auto":
            if has_bf16:
                return Precision("bf16", f"auto: {where}", dev)
            return Precision("32", f"auto: {where}, so bf16 would be emulated", dev)
    if not native[name]:
        print(f"warning: train.precision={name} is only emulated on this {where}; expect it to be slower than "
              f"train.precision=auto.", file=sys.stderr, flush=True)
        return Precision(name, f"explicit {name} (emulated on {where})", dev)
    return Precision(name, f"explicit {name} on {where}", dev)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode under ``torch.no_grad`` and restore each one's mode afterwards."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in zip(modules, was):
            m.train(training)


class Normalizer:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) on the device, constants kept there."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        # x / 255 - mean) / std folded into one multiply-add: x * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(self.device)
        self.channels_last = channels_last

    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        if u8.shape[-1] == 3 and u8.shape[1] != 3:
            u8 = u8.permute(0, 3, 1, 2)  # (B, 3, H, W), a view
        x = u8.to(self.device, non_blocking=True).float().mul_(self.scale).add_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def to_device_batch(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: pinned and non-blocking for CUDA, a plain copy on the CPU.

    A numpy batch (often a slice of the read-only decode cache) is copied once: straight into
    pinned memory on CUDA (torch's pinned allocator keeps the block until the copy has run),
    into a writable array on the CPU.
    """
    if isinstance(array, torch.Tensor):
        t = array
        if device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
    elif device.type == "cuda":
        t = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
        t.numpy()[...] = array  # (B, ...) one host copy, into the pinned block
    else:
        return torch.from_numpy(np.array(array))
    return t.to(device, non_blocking=True)


# forward_batches copies its outputs to the host once this many bytes have piled up on the device
# (once at the end for logits): one wait per flush instead of one per batch, memory bounded.
FLUSH_BYTES = 256 * 2**20


def forward_batches(fn: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray | torch.Tensor,
                    prepare: Callable[[torch.Tensor], torch.Tensor], precision: Precision, *,
                    batch_size: int = 256, device: torch.device, out_dtype: torch.dtype = torch.float32,
                    keep_on_device: bool = False, progress: Optional[str] = None) -> torch.Tensor:
    """``fn(prepare(batch))`` over ``inputs`` in batches under the precision policy.

    ``prepare`` turns a host batch on the device into the function's input (normalising
    uint8 images, casting cached features). Outputs are concatenated as ``out_dtype`` on the
    CPU, or on the device with ``keep_on_device`` (validation reads them with one sync). The
    host never waits per batch: outputs stay on the device and go to the host together, at
    the end or whenever :data:`FLUSH_BYTES` of them have piled up.
    """
    done: list = []  # host chunks (or device outputs with keep_on_device)
    pending: list = []  # device outputs not yet copied to the host
    pending_bytes = 0
    starts = range(0, len(inputs), batch_size)
    for start in tqdm(starts, desc=progress or "eval", disable=progress is None, leave=False, mininterval=1.0):
        x = prepare(to_device_batch(inputs[start:start + batch_size], device))
        with precision.autocast():
            y = fn(x)
        y = y.to(out_dtype)
        if keep_on_device or device.type == "cpu":
            done.append(y)
            continue
        pending.append(y)
        pending_bytes += y.numel() * y.element_size()
        if pending_bytes >= FLUSH_BYTES:
            done.append(torch.cat(pending).cpu())
            pending, pending_bytes = [], 0
    if pending:
        done.append(torch.cat(pending).cpu())
    if not done:
        return torch.zeros(0)
    return torch.cat(done)


def batched_logits(model: nn.Module, images: np.ndarray | torch.Tensor, mean: Sequence[float],
                   std: Sequence[float], precision: Precision, *, batch_size: int = 256,
                   tta_flip: bool = False, device: Optional[torch.device] = None, channels_last: bool = True,
                   keep_on_device: bool = False, progress: Optional[str] = None) -> torch.Tensor:
    """Float32 logits (N, classes) of uint8 (N, S, S, 3) images, normalised on the device.

    Runs in eval mode under no_grad (the model's mode is restored). With ``tta_flip`` the
    logits are averaged with the horizontally mirrored image's.
    """
    device = device or next(model.parameters()).device
    norm = Normalizer(mean, std, device, channels_last=channels_last)

    def fn(x: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        if tta_flip:
            logits = (logits + model(x.flip(3)).float()) / 2
        return logits

    with eval_mode(model):
        return forward_batches(fn, images, norm, precision, batch_size=batch_size, device=device,
                               keep_on_device=keep_on_device, progress=progress)


@dataclass
class Preprocess:
    """A checkpoint's preprocessing for files, arrays and crops: size, interpolation, crop_pct.

    Files and arrays come out as uint8 (S, S, 3), exactly what the training cache holds, so
    :func:`batched_logits` sees the same pixels in every mode.
    """

    size: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_spec(cls, spec) -> "Preprocess":
        return cls(int(spec.input_size), spec.interpolation, float(getattr(spec, "crop_pct", 1.0)))

    def file(self, path, name: Optional[str] = None) -> np.ndarray:
        """Decode one image file (path or binary file object) to uint8 (S, S, 3)."""
        return decode_image(path, self.size, self.interpolation, self.crop_pct, name=name)

    def array(self, rgb: np.ndarray) -> np.ndarray:
        """An RGB uint8 (H, W, 3) array (a detector's crop, a video frame) to uint8 (S, S, 3)."""
        return fit_image(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), self.size, self.interpolation,
                         self.crop_pct)


_CHOSEN: dict = {}


def process_precision(requested: object, device: torch.device, *, announce: bool = True) -> Precision:
    """:func:`choose_precision`, decided once per (request, device) in a process and announced once."""
    key = (normalise_precision_name(requested), str(device))
    if key not in _CHOSEN:
        _CHOSEN[key] = choose_precision(requested, device)
        if announce:
            print(f"precision {_CHOSEN[key].name}: {_CHOSEN[key].reason}", flush=True)
    return _CHOSEN[key]
