"""Progressive resizing (inat.training.resize): the schedule of sides, the model at any side, a real run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inat.errors import InatError
from inat.models.scratch import Architecture, ScratchCNN, count_params
from inat.training import resize as resize_mod
from inat.training.resize import SIDE_STEP, ResizeSchedule
from tests.conftest import FAST, make_dataset, run_cli
from tests.test_engine import compose


def test_schedule_holds_grows_and_ends_at_the_input_size():
    s = ResizeSchedule(native=96, start=64, hold=0.4, full=0.8)
    assert [s.side(p) for p in (0.0, 0.2, 0.4)] == [64, 64, 64]
    assert s.side(0.6) == 80  # halfway between 64 and 96, a multiple of 16
    assert [s.side(p) for p in (0.8, 0.9, 1.0)] == [96, 96, 96]
    sides = [s.side(i / 100) for i in range(101)]
    assert sides == sorted(sides) and set(sides) == {64, 80, 96}
    assert all(side % SIDE_STEP == 0 for side in sides)


@pytest.mark.parametrize("start,hold,full", [(128, 0.4, 0.8), (16, 0.4, 0.8), (64, 0.9, 0.5), (64, -0.1, 0.5)])
def test_schedule_refuses_impossible_settings(start, hold, full):
    with pytest.raises(InatError, match="train.resize"):
        ResizeSchedule(native=96, start=start, hold=hold, full=full)


def test_resize_returns_the_batch_itself_at_the_input_size_and_keeps_its_layout():
    s = ResizeSchedule(native=96, start=64, hold=0.5, full=0.5)
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    assert s(x, 1.0) is x
    small = s(x, 0.0)
    assert small.shape == (2, 3, 64, 64) and small.is_contiguous(memory_format=torch.channels_last)
    # antialiased bilinear: a constant image stays that constant
    assert torch.allclose(s(torch.full((1, 3, 96, 96), 0.7), 0.0), torch.full((1, 3, 64, 64), 0.7), atol=1e-6)


def test_scratch_cnn_takes_smaller_inputs_and_is_unchanged_at_its_own_size():
    arch = Architecture((8,) * 5, (3,) * 5, 16, 4, 96, 96, True)
    torch.manual_seed(0)
    net = ScratchCNN(arch, "relu", "relu", 0.0, "dense").eval()
    assert sum(p.numel() for p in net.parameters()) == count_params(arch)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        plain = net.out(net.dense(net.blocks(x)))  # the assignment's network, no adaptive pool
        assert torch.equal(net(x), plain)
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 4)  # last map 2x2, averaged to 3x3
        assert net(torch.randn(2, 3, 80, 80)).shape == (2, 4)


def test_a_run_trains_on_the_scheduled_sides_and_validates_at_the_input_size(tmp_path, monkeypatch):
    from inat.training.loop import fit

    seen = []
    original = ResizeSchedule.__call__

    def recording(self, x, progress):
        out = original(self, x, progress)
        seen.append(out.shape[-1])
        return out

    monkeypatch.setattr(resize_mod.ResizeSchedule, "__call__", recording)
    data = make_dataset(tmp_path / "data", n_train=12, size=64)
    overrides = [o for o in FAST if not o.startswith("data.image_size")]
    cfg = compose([f"data.root={data}", *overrides, "data.image_size=64", "train.epochs=4", "train.resize_start=32",
                   "train.resize_hold=0.25", "train.resize_full=0.75", "train.then_test=false"])
    summary = fit(cfg, tmp_path / "run")
    assert seen[0] == 32 and seen[-1] == 64 and seen == sorted(seen), seen
    assert set(seen) <= {32, 48, 64}
    assert summary["epochs"] == 4 and 0.0 <= summary["best_val_accuracy"] <= 1.0


def test_resizing_cached_backbone_outputs_is_refused_before_decoding(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=6, size=48)
    r = run_cli([f"data.root={data}", *FAST, "model=efficientnet_lite0", "model.input_size=64", "finetune=linear_probe",
                 "train.resize_start=32", "train.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train.resize_start=32 resizes the training images" in r.stderr + r.stdout
    assert not (tmp_path / "run" / "summary.json").exists()


def test_resize_start_above_the_input_size_is_one_sentence(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=6)
    r = run_cli([f"data.root={data}", *FAST, "train.resize_start=64", "train.epochs=1",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2
    assert "must be between 32 and the input size 32 px" in r.stderr + r.stdout


def _train(start="auto", minutes=1.0):
    from types import SimpleNamespace
    return SimpleNamespace(resize_start=start, resize_hold=0.4, resize_full=0.8, max_minutes=minutes)


def test_auto_resizes_the_scratch_cnn_on_the_cpu_under_a_time_budget():
    c = resize_mod.choose(_train(), 96, device_type="cpu", scratch=True, cached=False)
    assert c.schedule is not None and (c.schedule.start, c.schedule.native) == (resize_mod.AUTO_START, 96)
    assert c.name == "64->96px" and "train.resize_start=0 turns it off" in c.reason


@pytest.mark.parametrize("train,native,device,scratch,cached,why", [
    (_train(minutes=0), 96, "cpu", True, False, "no time budget"),
    (_train(), 96, "cuda", True, False, "on cuda"),
    (_train(), 96, "cpu", False, False, "pretrained backbone"),
    (_train(), 96, "cpu", False, True, "cached backbone outputs"),
    (_train(), 64, "cpu", True, False, "not above 64 px"),
])
def test_auto_stays_off_where_it_was_not_measured_to_pay(train, native, device, scratch, cached, why):
    c = resize_mod.choose(train, native, device_type=device, scratch=scratch, cached=cached)
    assert c.schedule is None and c.name == "off" and why in c.reason, c.reason


def test_an_explicit_side_applies_on_any_device_and_zero_is_off():
    on = resize_mod.choose(_train(48, minutes=0), 96, device_type="cuda", scratch=False, cached=False)
    assert on.name == "48->96px"
    assert resize_mod.choose(_train(0), 96, device_type="cpu", scratch=True, cached=False).name == "off"


def test_a_run_under_a_budget_records_its_resizing_in_the_summary(tmp_path):
    import json
    data = make_dataset(tmp_path / "data", n_train=6, size=80)
    overrides = [o for o in FAST if not o.startswith(("data.image_size", "train.max_minutes"))]
    r = run_cli([f"data.root={data}", *overrides, "data.image_size=80", "train.max_minutes=5", "train.epochs=1",
                 "train.then_test=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resize"] == "64->80px" and "train.resize_start=auto" in summary["resize_reason"]
    assert "progressive resizing: train.resize_start=auto" in r.stdout + r.stderr


def test_a_resize_start_that_is_not_a_side_is_one_sentence(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=6)
    r = run_cli([f"data.root={data}", *FAST, "train.resize_start=big", "train.epochs=1",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2
    assert "train.resize_start must be auto or a whole number of pixels (0 = off), got 'big'." in r.stderr + r.stdout
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "summary.json").exists()
