"""Partial fine-tuning on cached frozen-prefix outputs (finetune.cache_views): the cut, the run, the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli
from inat.config import ModelConfig
from inat.errors import InatError
from inat.models import create_model
from inat.models.freeze import _group_params, split_at


def _model(name: str, **kw):
    cfg = OmegaConf.structured(ModelConfig(name=name, pretrained=False, **kw))
    torch.manual_seed(0)
    return create_model(cfg, num_classes=4, image_size=64)


@pytest.mark.parametrize("name,kw", [("efficientnet_lite0", {}), ("torchvision", {"arch": "resnet18"})])
def test_every_cut_reproduces_the_model_and_holds_exactly_the_trained_groups(name, kw):
    model = _model(name, **kw).eval()
    groups = _group_params(model)
    x = torch.randn(2, 3, 64, 64)
    whole = model(x)
    for k in range(1, len(groups)):
        prefix, suffix = split_at(model, k)
        torch.testing.assert_close(suffix(prefix(x)), whole, rtol=1e-4, atol=1e-4)
        later = {id(p) for g in groups[k:] for p in g}
        assert {id(p) for p in suffix.parameters()} == later
        assert not later & {id(p) for p in prefix.parameters()}


def test_a_model_that_is_no_chain_is_refused_with_the_way_out():
    model = _model("timm", arch="resnet18")
    with pytest.raises(InatError, match="finetune.cache_views=0"):
        split_at(model, 2)


def test_head_dropout_follows_the_model_mode():
    model = _model("efficientnet_lite0", dropout=0.5)
    _, suffix = split_at(model, 9)
    feats = torch.randn(8, 1280, 2, 2)
    model.eval()
    torch.testing.assert_close(suffix(feats), suffix(feats))
    model.train()
    assert not torch.equal(suffix(feats), suffix(feats))


ARGS = ["model=efficientnet_lite0", "model.pretrained=false", "model.input_size=48", "finetune=partial", "finetune.k=7",
        "finetune.cache_views=2", "train.epochs=2", "train.batch_size=8", "train.threads=1", "data.workers=1",
        "wandb.mode=disabled", "train.max_minutes=0", "train.precision=32"]


def test_cached_partial_run_trains_only_the_suffix_and_its_val_matches_the_whole_model(tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data", n_train=24)
    run_dir = tmp_path / "run"
    proc = run_cli([f"data.root={data}", f"hydra.run.dir={run_dir}", *ARGS], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frozen outputs cached once" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cache_seconds"] > 0 and summary["epochs"] == 2

    from inat.checkpoint import load_checkpoint
    from inat.models import model_from_checkpoint
    from inat.inference import Precision, batched_logits

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model, spec, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.pt")
    groups = _group_params(model)
    assert summary["trainable_params"] == sum(p.numel() for g in groups[7:] for p in g)
    # The frozen groups are still the seeded initial weights; the trained ones moved.
    fresh = _model("efficientnet_lite0", input_size=48)
    fresh_state, state = fresh.state_dict(), model.state_dict()
    frozen = {n for n, p in model.named_parameters() if any(p is q for g in groups[:7] for q in g)}
    assert frozen and all(torch.equal(state[n], fresh_state[n]) for n in frozen)
    assert any(not torch.equal(state[n], fresh_state[n]) for n, _ in model.named_parameters() if n not in frozen)
    # Validation measured on cached prefix outputs = the whole model on the validation images.
    from inat.data.cache import load_or_build

    val = json.loads((run_dir / "split.json").read_text())["val"]
    images = load_or_build([data / r["path"] for r in val], spec.input_size, interpolation=spec.interpolation,
                           crop_pct=float(spec.crop_pct), directory=None, workers=1,
                           label="val", progress=False).images
    logits = batched_logits(model, images, spec.mean, spec.std, Precision("32", "test"), tta_flip=True,
                            device=torch.device("cpu"), channels_last=False)
    acc = float((logits.argmax(1).numpy() == np.array([r["label"] for r in val])).mean())
    assert acc == pytest.approx(ckpt["state"]["history"][-1]["val_accuracy"], abs=1e-6)


def test_bn_train_all_cannot_be_cached(tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data")
    proc = run_cli([f"data.root={data}", f"hydra.run.dir={tmp_path / 'run'}", *ARGS, "finetune.bn=train_all"],
                   timeout=300)
    assert proc.returncode == 2
    assert "finetune.bn=freeze_frozen" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
