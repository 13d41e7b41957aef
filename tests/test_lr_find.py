"""+mode=lr_find: the range test's suggestion against a small grid of fixed learning rates."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import FAST, make_dataset, run_cli
from inat.config import Config

OVERRIDES = [*FAST, "aug.flip=false", "aug.shift=0", "optim.label_smoothing=0.0", "train.precision=32"]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A generated 3-class problem with ~290 training images (so one epoch holds enough batches)."""
    return make_dataset(tmp_path_factory.mktemp("lr") / "data", n_classes=3, n_train=120, n_test=2, size=32)


def compose(root, *extra: str):
    cfg = OmegaConf.structured(Config)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"data.root={root}", *OVERRIDES, *extra]))


def loss_after_training(cfg, lr: float, steps: int) -> float:
    """Mean training loss of the last third of ``steps`` batches at a fixed lr (constant schedule)."""
    from inat.data.folder import scan_train
    from inat.models import build_from_config
    from inat.training import load_data, make_optimizer

    cfg = OmegaConf.merge(cfg, {"train": {"lr": lr}})
    folder = scan_train(cfg.data.root)
    torch.manual_seed(0)
    model = build_from_config(cfg, len(folder.classes))
    data = load_data(cfg.data, model.spec, cfg.data.root, folder, progress=False)
    opt = make_optimizer(model, cfg.train, cfg.optim, cfg.finetune)
    from inat.data.images import to_float

    gen = torch.Generator().manual_seed(0)
    bs, losses = int(cfg.train.batch_size), []
    model.train()
    for _ in range(steps):
        idx = np.sort(data.train_idx[torch.randint(len(data.train_idx), (bs,), generator=gen).numpy()])
        x = to_float(torch.from_numpy(np.array(data.images[idx])), model.spec.mean, model.spec.std)
        loss = F.cross_entropy(model(x), torch.from_numpy(data.labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses[-steps // 3:]))


def test_suggestion_is_within_a_decade_of_the_best_fixed_lr(problem, tmp_path):
    from inat.lr_find import find_lr

    torch.set_num_threads(1)
    cfg = compose(problem)
    result = find_lr(cfg, tmp_path, progress=False)
    assert result["steps"] <= 36 and result["epoch_fraction"] <= 1.0  # 288 train images / 8 = one epoch at most
    grid = [1e-4, 1e-3, 1e-2, 1e-1]
    scores = {lr: loss_after_training(cfg, lr, steps=60) for lr in grid}
    best = min(scores, key=scores.get)
    assert best / 10 <= result["suggestion"] <= best * 10, (result["suggestion"], scores)
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["rule"] == "steepest" and "steepest descent" in saved["rule_says"]
    assert saved["command"].endswith(f"train.lr={result['suggestion']:.2g}") and (tmp_path / "lr_find.png").is_file()


def test_param_group_ratios_are_kept_for_fine_tuning(problem, tmp_path):
    """A fine-tuned model's groups keep make_optimizer's ratios (finetune=full decays lr by group)."""
    from inat.lr_find import find_lr

    torch.set_num_threads(1)
    cfg = compose(problem, "finetune.strategy=full", "finetune.lr_decay=0.5", "lr_find.steps=10")
    result = find_lr(cfg, tmp_path, progress=False)
    ratios = sorted(set(result["group_lr_ratios"]))
    assert ratios[-1] == 1.0 and ratios[0] == pytest.approx(0.5 ** 6)  # 5 blocks, dense, head: 7 groups


def test_rules_on_a_drawn_curve():
    from inat.lr_find import ramp, smooth, suggest

    lrs = ramp(1e-5, 1.0, 100)
    x = np.log10(lrs)
    loss = 2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1.5, (x + 1.5) ** 2 * 4, 0)  # falls around 1e-3
    out = suggest(lrs, smooth(loss, 0.0))
    assert 3e-4 < out["steepest"] < 3e-3
    assert out["min_over_10"] == pytest.approx(lrs[int(np.argmin(loss))] / 10)


def test_cli_prints_the_command_and_never_reads_the_test_folder(problem, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(problem / "train", data / "train")  # no test folder at all
    out = tmp_path / "out"
    r = run_cli(["+mode=lr_find", f"data.root={data}", f"hydra.run.dir={out}", *OVERRIDES, "lr_find.steps=12",
                 "lr_find.rule=min_over_10"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train with: python run.py" in r.stdout and "lr_find.steps" not in r.stdout.split("train with:")[1]
    assert json.loads((out / "lr_find.json").read_text())["rule"] == "min_over_10"
