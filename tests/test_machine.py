"""The CPU facts every figure records: model name and the flags that pick torch's kernels."""
from __future__ import annotations

from inat import machine

AMX_XEON = """processor	: 0
model name	: Intel(R) Xeon(R) Processor
flags		: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AVX2_EPYC = """processor	: 0
model name	: AMD EPYC 7B13
flags		: fpu sse2 avx avx2 fma
"""


def test_features_tell_an_amx_cpu_from_an_avx2_one(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: AMX_XEON)
    assert machine.cpu_model() == "Intel(R) Xeon(R) Processor"
    assert machine.cpu_features() == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: AVX2_EPYC)
    assert machine.cpu_model() == "AMD EPYC 7B13" and machine.cpu_features() == ["avx2"]


def test_without_cpuinfo_the_model_is_platforms_guess_and_no_flags(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "")
    assert machine.cpu_model() and machine.cpu_features() == []


def test_older_torch_reads_native_bf16_from_the_flags(monkeypatch):
    """Without torch.cpu's cpuinfo answers (torch < 2.3), cpu_has_native_bf16 reads the same flags."""
    import torch

    from inat import inference

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(machine, "_cpuinfo", lambda: AMX_XEON)
    assert inference.cpu_has_native_bf16() is True
    monkeypatch.setattr(machine, "_cpuinfo", lambda: AVX2_EPYC)
    assert inference.cpu_has_native_bf16() is False


def test_the_report_machine_fallback_names_its_kernels_as_a_run_does(monkeypatch):
    """The report machine's own CPU cell used to show only the model, unlike a run's recorded one."""
    import torch

    from inat.report.provenance import this_machine

    monkeypatch.setattr(machine, "_cpuinfo", lambda: AMX_XEON)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpu = this_machine()["cpu"]
    assert cpu.startswith("Intel(R) Xeon(R) Processor (") and cpu.endswith(
        "logical CPUs), torch kernels AVX512 (avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8)")
    assert machine.describe_cpu("AMD EPYC 7B13") == "AMD EPYC 7B13"
    assert machine.describe_cpu("AMD EPYC 7B13", 2, "AVX2") == "AMD EPYC 7B13 (2 logical CPUs), torch kernels AVX2"
