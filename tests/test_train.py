"""Training runs end to end: run folder, test mode, leak guard, resume after SIGKILL, faults, DDP."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, SHARED, make_dataset, run_cli
from fit_hooks import hook_env


def train(data: Path, run_dir: Path, *extra: str, env: dict | None = None):
    return run_cli([f"data.root={data}", f"hydra.run.dir={run_dir}", *FAST, *extra], env=env)


def read_metrics(run_dir: Path, timing: bool = True):
    """Rows of metrics.csv; ``timing=False`` drops the wall-clock columns, which never repeat."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    if not timing:
        rows = [{k: v for k, v in row.items() if k not in ("images_per_sec", "seconds")} for row in rows]
    return rows


def test_train_writes_run_folder_then_tests(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = train(tiny_data, run, "train.epochs=2")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ["summary.json", "metrics.csv", "split.json", ".hydra/config.yaml", "checkpoints/best.pt",
                 "checkpoints/last.pt", "test/test.json"]:
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ["best_val_accuracy", "val_accuracy", "epochs", "train_images_per_sec", "wall_seconds", "params",
                "model", "config"]:
        assert key in summary
    assert summary["epochs"] == 2 and len(read_metrics(run)) == 2
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 48 and len(split["val"]) == 9
    result = json.loads((run / "test" / "test.json").read_text())
    assert result["n"] == 12 and set(result) >= {"accuracy", "n", "per_class_accuracy", "confusion_matrix", "classes", "ckpt"}
    assert sum(map(sum, result["confusion_matrix"])) == 12

    # +mode=test needs nothing but the checkpoint
    out = tmp_path / "test_out"
    r = run_cli(["+mode=test", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "test.json").read_text())["accuracy"] == result["accuracy"]


def test_test_mode_refuses_leaked_images(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_data, run, "train.epochs=1", "train.then_test=false").returncode == 0
    src = next((tiny_data / "train" / "class_1").iterdir())
    shutil.copy(src, tiny_data / "val" / "class_1" / "copied.png")
    out = tmp_path / "test_out"
    r = run_cli(["+mode=test", f"ckpt={run / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={out}"])
    assert r.returncode != 0
    assert "byte-identical" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "test.json").exists()


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=12)
    opts = ["train.epochs=3", "train.precision=32", "train.then_test=false", "model.dropout=0.3", "train.ema=0.9"]
    if torch.cuda.is_available():  # cuDNN autotuning may pick other (nondeterministic) kernels in each process
        opts.append("train.deterministic=true")
    whole = tmp_path / "whole"
    assert train(data, whole, *opts).returncode == 0
    broken = tmp_path / "broken"
    r = train(data, broken, *opts, env=hook_env(kill_after_epoch=1))
    assert r.returncode == -9  # SIGKILL
    assert not (broken / "summary.json").exists()  # a killed run never looks finished
    assert len(read_metrics(broken)) == 1
    r = train(data, broken, *opts, "resume=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Resuming from epoch 1" in r.stdout
    assert read_metrics(broken, timing=False) == read_metrics(whole, timing=False)
    a = torch.load(whole / "checkpoints/last.pt", weights_only=False)["model"]
    b = torch.load(broken / "checkpoints/last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_config_is_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_data, run, "train.epochs=1", "train.then_test=false").returncode == 0
    r = train(tiny_data, run, "train.epochs=1", "train.then_test=false", "train.lr=0.1", "resume=true")
    assert r.returncode != 0 and "differs" in r.stderr


def test_resume_compares_the_training_sections_only():
    """An allow-list: a key of another command, or a section added later, never blocks a resume."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from inat.config import Config
    from inat.training.resume import TRAINING_SECTIONS, _comparable

    assert set(TRAINING_SECTIONS) <= {f.name for f in fields(Config)}
    first = OmegaConf.to_container(OmegaConf.structured(Config))
    other_command = {**first, "runs": {**first["runs"], "sort": "name"}, "predict": {"top_k": 9}, "new_mode": {"x": 1}}
    assert _comparable(other_command) == _comparable(first)
    for section, key, value in (("train", "lr", 0.5), ("aug", "flip", False), ("finetune", "k", 2)):
        changed = {**first, section: {**first[section], key: value}}
        assert _comparable(changed) != _comparable(first), section
    assert _comparable({**first, "seed": 1}) != _comparable(first)


@pytest.mark.parametrize("case", ["missing", "empty_class", "corrupt", "non_image", "filters", "small", "no_ckpt",
                                  "foreign_ckpt", "missing_ckpt"])
def test_bad_input_one_sentence_nonzero_nothing_half_written(case, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_test=1)
    run = tmp_path / "run"
    extra = []
    if case == "missing":
        data = tmp_path / "nowhere"
    elif case == "empty_class":
        (data / "train" / "empty").mkdir()
    elif case == "corrupt":
        (data / "train" / "class_0" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    elif case == "non_image":
        (data / "train" / "class_0" / "notes.txt").write_text("hello")
    elif case == "filters":
        extra = ["filters=custom", "filters.custom=[8,8,8]"]
    elif case == "small":
        extra = ["data.image_size=16"]
    if case.endswith("ckpt"):
        ckpt = {"no_ckpt": "", "missing_ckpt": str(tmp_path / "nope.pt"), "foreign_ckpt": str(tmp_path / "foreign.pt")}[case]
        torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
        r = run_cli(["+mode=test", f"ckpt={ckpt}" if ckpt else "ckpt=null", f"hydra.run.dir={run}"])
    else:
        r = train(data, run, "train.epochs=1", *extra)
    assert r.returncode != 0
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and message.endswith("."), r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert not (run / "summary.json").exists() and not (run / "checkpoints").exists()
    assert not (run / "test.json").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_gloo(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(REPO / "run.py"),
           f"data.root={tiny_data}", f"hydra.run.dir={run}", *FAST, "train.epochs=2", "train.then_test=false"]
    # gloo on the CPU even on a GPU machine (which would otherwise pick NCCL and cuda:1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert (run / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_real_training_on_flowers5_beats_chance(tmp_path):
    data = SHARED / "datasets" / "flowers5"
    run = tmp_path / "flowers"
    r = run_cli([f"data.root={data}", f"hydra.run.dir={run}", "wandb.mode=disabled", "data.image_size=64",
                 "train.epochs=6", "train.batch_size=64"])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((run / "test" / "test.json").read_text())
    assert result["n"] == 855
    assert result["accuracy"] > 0.5, result["accuracy"]  # chance is 20% on 5 balanced-ish classes
