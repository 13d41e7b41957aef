"""The engine: precision policy per hardware class, GradScaler with fp16, no per-step host sync,
and DDP under a time budget and gradual unfreezing (two gloo processes on the CPU)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, make_dataset
from inat import inference
from inat.inference import Precision, choose_precision
from inat.machine import cpu_features


def compose(overrides):
    """The run config for ``overrides``, composed in-process as run.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from inat.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# --- precision policy ------------------------------------------------------------------------

def _mock_cpu(monkeypatch, native_bf16: bool, capability: str = "AVX2"):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.mark.parametrize("native, expected", [(False, "32"), (True, "bf16")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    _mock_cpu(monkeypatch, native, "AVX512" if native else "AVX2")
    p = choose_precision("auto", torch.device("cpu"))
    assert p.name == expected and p.reason.startswith("auto")
    assert not p.needs_scaler


@pytest.mark.parametrize("isa, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                         ("AVX512_CORE_AMX", True), ("", True)])
def test_onednn_capped_below_bf16_is_not_native(monkeypatch, isa, native):
    # On a bf16 CPU (the cpuinfo answers mocked True), a DNNL_MAX_CPU_ISA without bf16 instructions
    # makes oneDNN emulate bf16, so auto must train in fp32 as it would on an AVX2 machine.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", isa)
    assert inference.cpu_has_native_bf16() is native
    assert choose_precision("auto", torch.device("cpu")).name == ("bf16" if native else "32")


# Pascal 6.1 (GTX 10xx, P4, P40) computes fp16 at a fraction of its fp32 rate: fp32; the P100 (6.0) has fast fp16.
@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "16"), ((7, 0), "16"),
                                                  ((6, 0), "16"), ((6, 1), "32"), ((5, 2), "32")])
def test_auto_on_cuda_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(inference, "cuda_capability", lambda device: capability)
    p = choose_precision("auto", torch.device("cuda", 0))
    assert p.name == expected
    assert p.needs_scaler == (expected == "16")  # fp16 always trains with a GradScaler


@pytest.mark.parametrize("requested, device, capability, emulated", [
    ("bf16", "cpu", None, True), ("32", "cpu", None, False), ("16", "cpu", None, True),
    ("bf16", "cuda", (7, 5), True), ("bf16", "cuda", (8, 6), False), ("16", "cuda", (7, 5), False)])
def test_explicit_choice_is_kept_and_warns_when_emulated(monkeypatch, capsys, requested, device, capability, emulated):
    _mock_cpu(monkeypatch, False)
    monkeypatch.setattr(inference, "cuda_capability", lambda d: capability)
    p = choose_precision(requested, torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    assert p.name == requested
    err = capsys.readouterr().err
    assert ("emulated" in err) == emulated
    assert len(err.strip().splitlines()) == (1 if emulated else 0)  # one line, not a block


def test_aliases_and_unknown_precision():
    from inat.errors import InatError

    assert inference.normalise_precision_name(32) == "32" and inference.normalise_precision_name("fp16") == "16"
    with pytest.raises(InatError, match="valid are auto, 32, bf16, 16"):
        inference.normalise_precision_name("fp8")


def test_default_is_auto_and_recorded_in_summary(tmp_path):
    from inat.training import fit

    cfg = compose([f"data.root={make_dataset(tmp_path / 'data', n_train=6)}", *FAST, "train.epochs=1",
                   f"data.cache_dir={tmp_path / 'cache'}"])
    assert cfg.train.precision == "auto"
    summary = fit(cfg, tmp_path / "run")
    expected = choose_precision("auto", inference.pick_device())
    assert summary["precision"] == expected.name and summary["precision_reason"] == expected.reason
    assert summary["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["environment"]["cpu_features"] == cpu_features()  # AMX or not: the capability does not say


# --- the step: GradScaler, host syncs ---------------------------------------------------------

def _setup(tmp_path, *overrides, n_train=16):
    from inat.training import setup

    data = make_dataset(tmp_path / "data", n_train=n_train)
    cfg = compose([f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return setup(cfg, tmp_path / "run")


def test_fp16_trains_through_the_grad_scaler(tmp_path, monkeypatch):
    from inat.training.build import loss_fn
    from inat.training.loop import Budget, train_one_epoch

    s = _setup(tmp_path, "train.precision=16", "train.epochs=1")
    assert s.precision.name == "16" and s.scaler.is_enabled()
    calls = {"scale": 0, "step": 0, "update": 0}
    for name in calls:
        original = getattr(s.scaler, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(s.scaler, name, counted)
    budget = Budget(0, 10, s.device)
    train_one_epoch(s, 0, budget, loss_fn(s.recipe))
    steps = s.state["step"]
    assert steps > 0 and calls == {"scale": steps, "step": steps, "update": steps}
    assert s.scaler.get_scale() > 0


def test_fp32_and_bf16_need_no_scaler():
    assert not Precision("32", "").grad_scaler().is_enabled()
    assert not Precision("bf16", "").grad_scaler().is_enabled()


# Code whose syncs count: inat's own, and the torch code the step calls that reads tensors on the
# host (the GradScaler's found_inf check of a non-fused optimizer, AveragedModel's step count).
_SYNC_SOURCES = (str(REPO / "inat"), str(Path(torch.__file__).parent / "amp" / "grad_scaler.py"),
                 str(Path(torch.__file__).parent / "optim" / "swa_utils.py"))


def _count_host_syncs(monkeypatch):
    """Count what waits for the device on a GPU, made from ``_SYNC_SOURCES``.

    - tensor -> Python conversions (``item``, ``float()``, ``bool()``, ...);
    - blocking ``.to(device)`` of a one-element CPU tensor: on CUDA a host->device copy from
      pageable memory that waits for the stream (AveragedModel's ``n_averaged.to(device)``).
      Bigger CPU tensors are host batches, which the engine copies with ``non_blocking=True``;
      a dtype-only ``.to()`` moves nothing.
    """
    counter = {"n": 0, "where": []}

    def from_sources() -> bool:
        where = sys._getframe(2).f_code
        if where.co_filename.startswith(_SYNC_SOURCES):
            counter["n"] += 1
            counter["where"].append(f"{Path(where.co_filename).name}:{where.co_name}")
            return True
        return False

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            from_sources()
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "numpy"):
        wrap(name)
    original_to = torch.Tensor.to

    def counted_to(self, *args, **kwargs):
        moves = "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)
        if moves and self.device.type == "cpu" and self.numel() == 1 and not kwargs.get("non_blocking", False):
            from_sources()
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted_to)
    return counter


def _cuda_optimizer(s, cfg):
    """The optimizer ``build`` makes on a GPU (fused), here on the CPU parameters: fused SGD has CPU kernels."""
    from inat.training.optim import make_optimizer

    return make_optimizer(s.model, cfg.train, cfg.optim, cfg.finetune, torch.device("cuda"))


# Every recipe the review found syncing (E1-E4): defaults, CutMix + erasing + crops, TrivialAugment,
# EMA, and SGD under fp16's GradScaler with the optimizer a GPU run builds.
SYNC_RECIPES = {"defaults": [], "aug_strong": ["aug=strong"], "trivial_augment": ["aug.trivial_augment=true"],
                "ema": ["train.ema=0.9"], "sgd_fp16": ["optim=sgd", "train.precision=16"]}


@pytest.mark.parametrize("recipe", list(SYNC_RECIPES))
def test_no_host_sync_per_step(tmp_path, monkeypatch, recipe):
    from inat.training.build import loss_fn
    from inat.training.loop import Budget, train_one_epoch

    counts = []
    for batch_size, n_train in ((8, 8), (2, 16)):  # 2 steps vs 20 steps per epoch
        s = _setup(tmp_path / f"b{batch_size}", f"train.batch_size={batch_size}", "train.epochs=2",
                   "train.max_minutes=10", *SYNC_RECIPES[recipe], n_train=n_train)
        if recipe == "sgd_fp16":
            assert s.scaler.is_enabled()
            s.optimizer = _cuda_optimizer(s, compose(SYNC_RECIPES[recipe]))  # the sections the optimizer reads
        counter = _count_host_syncs(monkeypatch)
        train_one_epoch(s, 0, Budget(600, 100, s.device), loss_fn(s.recipe))
        counts.append((s.state["step"], counter["n"], counter["where"]))
        monkeypatch.undo()
    (few_steps, few_syncs, _), (many_steps, many_syncs, where) = counts
    assert many_steps >= 5 * few_steps
    assert many_syncs == few_syncs <= 3, (counts, where)  # the epoch's totals, read once


# --- DDP: two gloo processes on the CPU ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, overrides: list, run_dir: str, skew: float,
                other_node: bool) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
                       "WANDB_MODE": "disabled"})
    if rank == 1 and skew != 1.0:  # rank 1's clock runs fast: it would reach the budget first
        import inat.training.loop as loop

        real = time.perf_counter
        start = real()
        fast = type("FastClock", (), {"perf_counter": staticmethod(lambda: start + (real() - start) * skew)})
        loop.time = fast
    if rank == 1 and other_node:  # rank 1 on a second node: the run folder there holds no checkpoint
        import inat.training.resume as resume

        def elsewhere(path, *args, **kwargs):
            raise AssertionError(f"rank 1 opened {path}, which only rank 0's node has")

        resume.load_checkpoint = elsewhere
    from fit_hooks import RankDigest
    from inat.training import fit

    fit(compose(overrides), Path(run_dir), callbacks=[RankDigest()])


def _run_ddp(tmp_path, overrides, skew=1.0, timeout=240, other_node=False):
    """Two gloo ranks training ``overrides`` into ``tmp_path/run`` (which may exist: a resume); their digests."""
    import torch.multiprocessing as mp

    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), overrides, str(run), skew, other_node), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP ranks hung (no exit within the timeout)")
    return [json.loads((run / f"rank{r}.digest.json").read_text()) for r in (0, 1)], run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_budget_stop_is_rank_zeros_decision(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=24)
    overrides = [f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=200",
                 "train.max_minutes=0.06", "train.then_test=false", "train.batch_size=4"]
    digests, run = _run_ddp(tmp_path, overrides, skew=3.0)
    assert digests[0]["step"] == digests[1]["step"] > 0
    assert digests[0]["sha256"] == digests[1]["sha256"]  # same weights: same steps, same learning rates
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["world_size"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_gradual_unfreezing_keeps_replicas_identical(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=16)
    overrides = [f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=3",
                 "train.then_test=false", "finetune=gradual", "finetune.every=1", "train.batch_size=4"]
    digests, _ = _run_ddp(tmp_path, overrides)
    assert digests[0]["step"] == digests[1]["step"] > 0
    assert digests[0]["sha256"] == digests[1]["sha256"]
    assert digests[0]["rebuilds"] == 3  # DDP rebuilt each time the trainable set grew
