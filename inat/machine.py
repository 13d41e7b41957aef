"""The CPU a number was measured on: its model name and the instruction sets that pick torch's kernels.

``torch.backends.cpu.get_cpu_capability()`` says ``AVX512`` both on a CPU with native bf16 matrix
units (AMX) and on one without, yet bf16 training runs at different speeds on the two, so a
figure records the flags too. Linux only (``/proc/cpuinfo``); elsewhere the model is platform's
guess and the flags are empty.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import List, Optional, Sequence

# The flags that decide which of torch's and oneDNN's CPU kernels run, in order of arrival.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> List[str]:
    """Which of ``KERNEL_FLAGS`` the first CPU lists, e.g. ``['avx2', 'avx512f', ..., 'amx_bf16']``."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in KERNEL_FLAGS if f in flags]
    return []


def describe_cpu(model: str, count: Optional[int] = None, capability: Optional[str] = None,
                 features: Sequence[str] = ()) -> str:
    """One line for a provenance cell, e.g. ``Intel Xeon (2 logical CPUs), torch kernels AVX512 (avx2 ... amx_bf16)``.

    The capability alone reads alike on an AMX Xeon and an AVX512-BF16 EPYC; the flags tell them apart.
    """
    text = model + (f" ({count} logical CPUs)" if count else "")
    if capability:
        text += f", torch kernels {capability}" + (f" ({' '.join(features)})" if features else "")
    return text
