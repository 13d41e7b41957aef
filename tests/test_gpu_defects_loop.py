"""The reviewed CUDA defects of the loop, augmentation, EMA, optimizer and inference, caught on the CPU.

``../shared/reviews/gpu-2026-12-02.md`` §2 (E1-E22) and §4: each test names its defect. Code
behind ``device.type == "cuda"`` is reached by mocking the few torch.cuda calls it makes; the
host-sync counter over every recipe lives in ``test_engine.test_no_host_sync_per_step``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import torch

from conftest import FAST, make_dataset
from test_engine import _run_ddp, _setup, compose


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int, h: int = 24, w: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=_gen(seed))  # (B, H, W, 3)


# --- E1: mixup / CutMix / TrivialAugment draw on the host, never from the global RNG -------------------

@pytest.mark.parametrize("overrides", [["aug=strong", "aug.mixup=0.4"], ["aug.trivial_augment=true"]])
def test_augment_leaves_the_global_rng_alone_and_repeats_for_a_seed(overrides):
    from inat.data.augment import BatchAugment

    aug = BatchAugment(compose(overrides).aug, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), num_classes=3)
    x, y = _images(16), torch.arange(16) % 3
    before = torch.get_rng_state()
    first = [aug(x, y, _gen(5)) for _ in range(3)]  # a new generator each time, as each epoch brings
    assert torch.equal(torch.get_rng_state(), before)  # the old code called torch.manual_seed every step
    for out, target in first[1:]:
        assert torch.equal(out, first[0][0]) and torch.equal(target, first[0][1])
    assert not torch.equal(aug(x, y, _gen(6))[0], first[0][0])
    if target.ndim == 2:  # soft targets of a mix: two classes' shares summing to one
        torch.testing.assert_close(target.sum(1), torch.ones(16))


def test_mixup_blends_each_image_with_its_neighbour_by_the_target_share():
    from inat.data.augment import mix_batch

    x = torch.rand(6, 3, 8, 8, generator=_gen(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out, soft = mix_batch(x, y, 3, [("mixup", 1.0)], np.random.default_rng(0))
    lam = float(soft[0, 0])  # image 0's own class share (its neighbour, image 5, is class 2)
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.roll(1, 0))
    torch.testing.assert_close(soft[torch.arange(6), y], torch.full((6,), lam))


def test_cutmix_pastes_one_box_from_the_neighbour_and_the_target_says_its_area():
    from inat.data.augment import mix_batch

    x = torch.rand(4, 3, 16, 20, generator=_gen(1))
    y = torch.tensor([0, 1, 0, 1])
    for seed in range(5):
        out, soft = mix_batch(x, y, 2, [("cutmix", 1.0)], np.random.default_rng(seed))
        from_neighbour = (out != x).any(1)  # (B, H, W)
        assert torch.equal(out[from_neighbour.unsqueeze(1).expand_as(out)],
                           x.roll(1, 0)[from_neighbour.unsqueeze(1).expand_as(out)])
        share = from_neighbour.float().mean(dim=(1, 2))  # the same box in every image
        torch.testing.assert_close(soft[torch.arange(4), y], 1 - share, atol=1e-6, rtol=0)


# --- E2: TrivialAugment per op on the sub-batch that drew it ----------------------------------------------

def test_trivial_augment_ops_match_torchvision_image_by_image():
    from torchvision.transforms.v2 import InterpolationMode, TrivialAugmentWide

    from inat.data import augment

    ta = TrivialAugmentWide()
    x = _images(5).permute(0, 3, 1, 2)  # (B, 3, H, W), the layout BatchAugment hands over
    for k, name in enumerate(augment.TA_OPS):
        for level in (0, 9, 20, 30):
            for sign in (1.0, -1.0) if augment._SIGNED[k] else (1.0,):
                mag = sign * augment._MAGNITUDES[k, level]
                ours = augment.apply_trivial_augment(x, np.full(5, k), np.full(5, mag))
                ref = torch.stack([ta._apply_image_or_video_transform(img, name, float(mag), InterpolationMode.NEAREST,
                                                                      ta._fill) for img in x])
                diff = (ours.int() - ref.int()).abs()
                # geometric ops are exact; blends round once differently (1 level, < 1% of the pixels)
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, mag)


def test_trivial_augment_costs_the_same_number_of_ops_at_any_batch_size():
    from torch.overrides import TorchFunctionMode

    from inat.data import augment

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    calls = []
    for per_op in (1, 6):  # every op present, once or six times
        ops = np.repeat(np.arange(len(augment.TA_OPS)), per_op)
        x = _images(len(ops)).permute(0, 3, 1, 2)
        augment.apply_trivial_augment(x, ops, np.full(len(ops), 0.5))  # builds the per-device constants
        Count.n = 0
        with Count():
            augment.apply_trivial_augment(x, ops, np.full(len(ops), 0.5))
        calls.append(Count.n)
    assert calls[0] == calls[1], calls  # the old per-image loop made six times as many


# --- E3: the EMA keeps its count on the host ---------------------------------------------------------------

def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 2))


def test_ema_averages_as_averaged_model_and_loads_its_checkpoints():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from inat.training.ema import ModelEMA

    model = _bn_model()
    old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = ModelEMA(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8)).sum().backward()
        opt.step()
        old.update_parameters(model)
        ema.update()
    ours, theirs = ema.state_dict(), old.state_dict()
    assert ours.keys() == theirs.keys() and int(ours["n_averaged"]) == 4
    for key, value in theirs.items():
        if value.is_floating_point():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    assert int(ours["module.1.num_batches_tracked"]) == 4  # copied (AveragedModel averaged the counter)
    resumed = ModelEMA(_bn_model(), 0.9)
    resumed.load_state_dict(theirs)  # an `ema_full` written before this class
    assert resumed.steps == 4
    torch.testing.assert_close(resumed.module[3].weight, old.module[3].weight, rtol=0, atol=0)


# --- E4: fused SGD on CUDA -----------------------------------------------------------------------------------

def test_sgd_is_fused_on_cuda_and_unchanged_on_the_cpu():
    from inat.training.optim import make_optimizer

    cfg = compose(["optim=sgd"])
    model = _bn_model()
    on_gpu = make_optimizer(model, cfg.train, cfg.optim, cfg.finetune, torch.device("cuda"))
    assert isinstance(on_gpu, torch.optim.SGD) and on_gpu.defaults["fused"]
    assert getattr(on_gpu, "_step_supports_amp_scaling", False)  # GradScaler hands found_inf to the kernel
    on_cpu = make_optimizer(model, cfg.train, cfg.optim, cfg.finetune, torch.device("cpu"))
    assert not on_cpu.defaults.get("fused")


# --- E6: the epoch's time includes the work still queued on the device -----------------------------------

def test_epoch_time_is_read_after_the_device_finished(tmp_path, monkeypatch):
    from inat.training.build import loss_fn
    from inat.training.loop import Budget, train_one_epoch

    s = _setup(tmp_path, "train.epochs=1")
    real_item = torch.Tensor.item
    tail = {"waited": False}

    def item_on_a_slow_device(self):  # the loop's first read waits for the queued steps, as on a GPU
        if not tail["waited"] and sys._getframe(1).f_code.co_filename.endswith(os.path.join("training", "loop.py")):
            tail["waited"] = True
            time.sleep(0.5)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item_on_a_slow_device)
    row = train_one_epoch(s, 0, Budget(0, 10, s.device), loss_fn(s.recipe))
    assert tail["waited"] and s.state["train_seconds"] >= 0.5, s.state["train_seconds"]
    assert row["images_per_sec"] <= s.state["step"] * 8 / 0.5


def test_summary_reports_epoch_one_apart_from_the_steady_rate(tmp_path):
    import csv

    from inat.training import fit

    data = make_dataset(tmp_path / "data", n_train=8)
    fit(compose([f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=3"]),
        tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    with open(tmp_path / "run" / "metrics.csv") as f:
        rates = [float(row["images_per_sec"]) for row in csv.DictReader(f)]
    assert summary["first_epoch_images_per_sec"] == rates[0]  # autotuning, compilation, cold caches
    assert summary["steady_images_per_sec"] == pytest.approx(sum(rates[1:]) / 2, abs=0.1)
    assert summary["train_images_per_sec"] == pytest.approx(sum(rates) / 3, abs=0.1)  # kept, as before


# --- E7: inference copies its outputs to the host once, not per batch --------------------------------------

def test_forward_batches_on_cuda_copies_to_the_host_once(monkeypatch):
    from inat import inference
    from inat.inference import Precision, forward_batches

    monkeypatch.setattr(inference, "to_device_batch", lambda batch, device: torch.from_numpy(np.array(batch)))
    copies = {"n": 0}
    real_cpu = torch.Tensor.cpu

    def counted_cpu(self, *args, **kwargs):
        copies["n"] += 1
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    images = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    out = forward_batches(lambda x: x * 2, images, lambda x: x, Precision("32", ""), batch_size=4,
                          device=torch.device("cuda"))
    assert copies["n"] == 1  # ten batches; the old loop copied each one, waiting for the device ten times
    torch.testing.assert_close(out, torch.from_numpy(images) * 2)
    monkeypatch.setattr(inference, "FLUSH_BYTES", 4 * 3 * 4 * 3)  # three batches' worth: device memory is bounded
    copies["n"] = 0
    out = forward_batches(lambda x: x * 2, images, lambda x: x, Precision("32", ""), batch_size=4,
                          device=torch.device("cuda"))
    assert copies["n"] == 4
    torch.testing.assert_close(out, torch.from_numpy(images) * 2)


# --- E10 / E15: torchrun resume reads last.pt on rank 0 only; validation is sharded ---------------------------

def test_torchrun_ranks_in_different_run_folders_are_refused(monkeypatch, tmp_path):
    from inat.errors import InatError
    from inat.training import build, distributed

    monkeypatch.setattr(distributed, "decide", lambda value: str(tmp_path / "2026-12-02_10-00-01"))  # rank 0's
    monkeypatch.setattr(build, "sum_over_ranks", lambda values, device: [float(v) for v in values])  # this rank alone
    with pytest.raises(InatError, match="hydra.run.dir=RUN_DIR"):
        build.check_same_run_dir(tmp_path / "2026-12-02_10-00-00", torch.device("cpu"))
    build.check_same_run_dir(tmp_path / "2026-12-02_10-00-01", torch.device("cpu"))  # rank 0's folder: fine


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_validates_a_shard_per_rank_and_resumes_from_rank_zeros_checkpoint(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=16)
    overrides = [f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2",
                 "train.then_test=false", "train.batch_size=4"]
    digests, run = _run_ddp(tmp_path, overrides)
    n_val = json.loads((run / "summary.json").read_text())["n_val"]
    assert [d["val_images"] for d in digests] == [(n_val + 1) // 2, n_val // 2]  # each rank its share
    assert digests[0]["val_accuracy"] == digests[1]["val_accuracy"]  # summed over ranks: one number
    assert digests[0]["val_loss"] == pytest.approx(digests[1]["val_loss"], abs=1e-6)
    # Resumed with rank 1 unable to open last.pt (a second node): rank 0 reads it and broadcasts it.
    resumed, _ = _run_ddp(tmp_path, [*overrides, "resume=true"], other_node=True)
    assert [d["step"] for d in resumed] == [d["step"] for d in digests]
    assert [d["sha256"] for d in resumed] == [d["sha256"] for d in digests]


# --- E11: LOCAL_RANK wraps around the visible GPUs -------------------------------------------------------

@pytest.mark.parametrize("local_rank, visible, expected", [("1", 1, 0), ("1", 2, 1), ("3", 2, 1), ("0", 1, 0)])
def test_pick_device_maps_the_local_rank_onto_the_visible_gpus(monkeypatch, local_rank, visible, expected):
    from inat.inference import pick_device

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert pick_device() == torch.device("cuda", expected)


# --- E14: the cached probe's fallback under torchrun is said ------------------------------------------------

def test_cached_probe_under_torchrun_says_it_falls_back_to_images(tmp_path, monkeypatch, capsys):
    from inat.training import build
    from inat.training.sources import ImageSource

    monkeypatch.setattr(build, "world", lambda: (0, 2))
    s = _setup(tmp_path, "finetune=linear_probe", "train.epochs=1")
    assert isinstance(s.source, ImageSource)
    lines = [line for line in capsys.readouterr().out.splitlines() if "finetune.cached_features" in line]
    assert len(lines) == 1 and "torchrun" in lines[0]


# --- E21: the backend flags are the process's again after fit ---------------------------------------------

def test_deterministic_fit_puts_the_backend_flags_back(tmp_path):
    from inat.training import fit

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    data = make_dataset(tmp_path / "data", n_train=6)
    fit(compose([f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
                 "train.deterministic=true"]), tmp_path / "run")
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before


# --- §4.3: an fp16 resume on the CPU restores the GradScaler --------------------------------------------------

def test_fp16_resume_restores_the_grad_scaler(tmp_path):
    from inat.training import fit, setup

    data = make_dataset(tmp_path / "data", n_train=8)
    args = [f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
            "train.precision=16", "train.batch_size=4"]
    fit(compose(args), tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["scaler"]
    assert saved is not None and saved["_growth_tracker"] > 0  # GradScaler("cpu") was enabled and stepped
    s = setup(compose([*args, "resume=true"]), tmp_path / "run")
    assert s.scaler.is_enabled() and s.scaler.state_dict() == saved


# --- §4.4: the CUDA RNG is saved and restored for the run's own device ----------------------------------------

def test_cuda_rng_is_saved_and_restored_for_the_runs_device(monkeypatch):
    from inat.training.writer import restore_rng, rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    device = torch.device("cuda", 1)
    state = rng_state(device)
    restore_rng(state, device)
    assert [c[:2] for c in calls] == [("get", device), ("set", device)] and torch.equal(calls[1][2], torch.ones(4))
