"""Fault battery, part 1: bad configuration, bad overrides and bad sweeps (issue 14).

Every bad input must end in exactly one ``error:`` sentence that names the key and what
would be valid, exit code 2, and no traceback. Most cases run in-process through
``inat.cli.prepare_argv`` (the code ``run.py`` runs before Hydra starts), which costs a
composition (~0.2 s) instead of a Python start-up; a few end-to-end ``run.py`` runs at the
end prove the same path from the shell. Part 2 (files, checkpoints, filesystem, download)
is ``test_faults_files.py``.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable, List

import pytest

import inat
from conftest import FAST, make_dataset, run_cli
from inat.errors import InatError


PROGRESS = re.compile(r"\|\s*\d+/\d+ \[|^\s+$")


def assert_one_error(text: str, *needles: str) -> str:
    """The output holds exactly one ``error:`` line, no traceback, and every needle; returns the line."""
    # Progress bars (tqdm, drawn with \r) are not messages; everything else counts.
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and not PROGRESS.search(line)]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in text, text
    assert len(errors) == 1, text
    assert len(lines) == 1, f"more than the error line: {text}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def fails_cleanly(capsys, fn: Callable[[], object], *needles: str) -> str:
    """Run ``fn`` as ``inat.run`` does (InatError -> one sentence, exit 2) and check the result."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        try:
            fn()
        except InatError as err:
            inat._fail(str(err))
    assert exc.value.code == 2
    return assert_one_error(capsys.readouterr().err, *needles)


def cli_fails(capsys, monkeypatch, args: List[str], *needles: str) -> str:
    """``run.py ARGS`` up to Hydra's start: the sentence, exit 2, nothing else printed."""
    from inat.cli import prepare_argv

    monkeypatch.setattr(sys, "argv", ["run.py", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        prepare_argv()
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    return assert_one_error(out.err, *needles)


# --------------------------------------------------------------------------- numeric ranges (cause 6, 7)

RANGE_CASES = [
    ("train.batch_size=0", ">= 1"), ("train.batch_size=-5", ">= 1"), ("train.lr=-1", "> 0"), ("train.lr=0", "> 0"),
    ("train.lr=inf", "> 0"), ("train.lr=nan", "> 0"), ("train.eval_batch_size=0", ">= 1"),
    ("data.split_seed=-1", ">= 0"), ("train.ema=1.5", "< 1"), ("train.ema=1", "< 1"), ("train.ema=-0.1", ">= 0"),
    ("optim.label_smoothing=2", "< 1"), ("data.workers=-1", ">= 0"), ("predict.workers=-1", ">= 0"),
    ("export.opset=3", ">= 7"), ("export.opset=99", "<= 23"), ("explain.per_class=0", ">= 1"),
    ("train.epochs=0", ">= 1"), ("train.epochs=-2", ">= 1"), ("data.val_fraction=0", "> 0"),
    ("data.val_fraction=1", "< 1"), ("data.val_fraction=1.5", "< 1"), ("data.image_size=0", ">= 8"),
    ("data.image_size=5000", "<= 4096"), ("model.dropout=1", "< 1"), ("model.dropout=-0.1", ">= 0"),
    ("model.dense_units=0", ">= 1"), ("model.drop_path=1", "< 1"), ("model.input_size=2", ">= 8"),
    ("filters.base=0", ">= 1"), ("aug.crop_scale=0", "> 0"), ("aug.crop_scale=1.5", "<= 1"),
    ("aug.erasing=2", "<= 1"), ("aug.shift=-1", ">= 0"), ("aug.mixup=-1", ">= 0"), ("aug.color=3", "<= 1"),
    ("finetune.every=0", ">= 1"), ("finetune.k=-1", ">= 0"), ("finetune.lr_decay=0", "> 0"),
    ("finetune.cache_views=-1", ">= 0"), ("optim.momentum=1", "< 1"), ("optim.weight_decay=-0.1", ">= 0"),
    ("optim.warmup_epochs=-1", ">= 0"), ("optim.grad_clip=-1", ">= 0"), ("train.max_minutes=-1", ">= 0"),
    ("train.threads=-1", ">= 0"), ("train.early_stopping=-1", ">= 0"), ("train.log_every=-1", ">= 0"),
    ("train.devices=2", "torchrun --nproc_per_node"), ("train.devices=0", "must be 1"), ("explain.n_neurons=0", ">= 1"),
    ("explain.batch_size=0", ">= 1"), ("explain.seed=-1", ">= 0"), ("predict.top_k=0", ">= 1"),
    ("predict.batch_size=0", ">= 1"), ("export.verify_images=0", ">= 1"), ("export.tolerance=0", "> 0"),
    ("detect.conf=1.5", "<= 1"), ("detect.iou=-0.1", ">= 0"), ("detect.size=0", ">= 32"),
    ("detect.size=100", "multiple of 32"), ("detect.loiter_frames=0", ">= 1"), ("seed=-1", ">= 0"),
    ("act.alpha=0", "> 0"), ("act.negative_slope=-1", ">= 0"), ("sweep.budget_minutes=-1", ">= 0"),
    ("sweep.prune_min_trials=-1", ">= 0"),
]


@pytest.mark.parametrize("override,valid", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_out_of_range_number_names_key_and_range(capsys, monkeypatch, override, valid):
    key = override.split("=")[0]
    cli_fails(capsys, monkeypatch, [override], f"error: {key} must be", valid)


# --------------------------------------------------------------------------- choices (cause 7, 8)

CHOICE_CASES = [
    ("optim.schedule=bogus", "onecycle, cosine, constant"), ("optim.name=rmsprop", "adamw, adam, sgd"),
    ("train.precision=64", "bf16"), ("model.dropout_where=everywhere", "dense, conv, both"),
    ("finetune.bn=sometimes", "freeze_frozen"), ("wandb.mode=cloud", "online, offline, disabled"),
    ("explain.pick=best", "random, confident, mistakes"), ("explain.what=[grid,bogus]", "guided_backprop"),
    ("export.format=tflite", "onnx, torchscript"), ("export.onnx_exporter=fast", "legacy, dynamo"),
    ("act.name=mishh", "mish"), ("model.dense_act=swishy", "relu"), ("finetune.strategy=most", "linear_probe"),
    ("filters.organisation=random", "doubling"),
]


@pytest.mark.parametrize("override,valid", CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_unknown_name_lists_the_valid_ones(capsys, monkeypatch, override, valid):
    key = override.split("=")[0]
    cli_fails(capsys, monkeypatch, [override], key, "valid are", valid)


GROUP_CASES = [
    (["act=mishh"], "act=mishh", "gelu, leaky_relu, mish"), (["+mode=bogus"], "mode=bogus", "explain, export"),
    (["model=resnet5"], "model=resnet5", "resnet50"), (["filters=doubles"], "filters=doubles", "doubling"),
    (["aug=heavy"], "aug=heavy", "basic"), (["finetune=partiall"], "finetune=partiall", "partial"),
    (["optim=rmsprop"], "optim=rmsprop", "adamw"), (["data=bogus"], "data=bogus", "default"),
    (["hydra/sweeper=bogus"], "hydra/sweeper=bogus", "optuna"), (["mode=test"], "+mode=test", "plus"),
]


@pytest.mark.parametrize("args,named,valid", GROUP_CASES, ids=[c[1] for c in GROUP_CASES])
def test_mistyped_group_choice_lists_the_options(capsys, monkeypatch, args, named, valid):
    cli_fails(capsys, monkeypatch, args, named, valid)


OTHER_VALUE_CASES = [
    ("data.sha256=xyz", "64 hexadecimal"), ("data.sha256=" + "a" * 63, "64 hexadecimal"),
    ("data.sha256=" + "g" * 64, "64 hexadecimal"), ("explain.what=[]", "explain.what is empty"),
    ("model.kernel_size=0", "model.kernel_size"), ("model.kernel_size=[3,3]", "list of 5"),
    ("filters.custom=[8,16]", "filters.custom"),
]


@pytest.mark.parametrize("override,needle", OTHER_VALUE_CASES, ids=[c[0][:40] for c in OTHER_VALUE_CASES])
def test_malformed_values_are_refused_at_start(capsys, monkeypatch, override, needle):
    args = [override] + (["filters=custom"] if override.startswith("filters.custom") else [])
    cli_fails(capsys, monkeypatch, args, needle)


# --------------------------------------------------------------------------- types and parse errors (cause 8)

TYPE_CASES = [
    ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
    ("train.epochs=1.5", "train.epochs must be an integer, got '1.5'"),
    ("train.epochs=[1,2]", "train.epochs must be an integer, got '[1,2]'"),
    ("train.epochs=", "train.epochs must be an integer, got ''"),
    ("train.epochs.x=1", "'train.epochs' is a single value (an integer)"),
    ("explain.what=grid", "explain.what must be a list"), ("predict.inputs=photo.jpg", "predict.inputs must be a list"),
    ("model.batch_norm=maybe", "model.batch_norm must be true or false"), ("train.lr=abc", "train.lr must be a number"),
    ("data.val_fraction=[0.1]", "data.val_fraction must be a number"), ("data.root=[a,b]", "data.root must be a string"),
    ("filters.custom=abc", "filters.custom must be a list of integers"), ("model.input_size=big", "or null"),
    ("train.lr=interval(0.1", "Could not parse the override"), ("train.lr=)", "Could not parse the override"),
    ("train.lr=choice(1,2)", "add -m"), ("trian.epochs=1", "Unknown config key 'trian.epochs'"),
    ("train.epoch=3", "did you mean 'train.epochs'"),
]


@pytest.mark.parametrize("override,needle", TYPE_CASES, ids=[c[0] or "empty" for c in TYPE_CASES])
def test_wrong_type_or_syntax_is_one_sentence(capsys, monkeypatch, override, needle):
    cli_fails(capsys, monkeypatch, [override], needle)


@pytest.mark.parametrize("case", ["run_dir_is_a_file", "run_dir_below_a_file", "run_dir_read_only", "sweep_dir_below_a_file"])
def test_output_folder_hydra_cannot_write(capsys, monkeypatch, tmp_path, case):
    (tmp_path / "f").write_text("a file")
    key = "hydra.sweep.dir" if case.startswith("sweep") else "hydra.run.dir"
    folder = {"run_dir_is_a_file": tmp_path / "f", "run_dir_below_a_file": tmp_path / "f" / "run",
              "run_dir_read_only": tmp_path / "ro" / "run", "sweep_dir_below_a_file": tmp_path / "f" / "sweep"}[case]
    needle = {"run_dir_is_a_file": "is a file;", "run_dir_read_only": "read-only"}.get(case, "which is a file")
    if case == "run_dir_read_only":
        (tmp_path / "ro").mkdir()
        real = os.access  # root may write anywhere: answer as the kernel would for a read-only mount
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    args = (["-m", "hydra/sweeper=optuna"] if key == "hydra.sweep.dir" else []) + [f"{key}={folder}"]
    cli_fails(capsys, monkeypatch, args, key, needle)


@pytest.mark.parametrize("args", [["model=scratch", "act=mish", "filters=doubling"], ["-m", "hydra/sweeper=optuna"],
                                  ["finetune=partial_k=3", "model=resnet50"], ["+mode=test", "ckpt=x"],
                                  ["train.epochs=3", "train.lr=0.01", "data.sha256=" + "a" * 64],
                                  # every documented choice passes: Grad-CAM, calibration-era and lr_find keys
                                  ["+mode=explain", "ckpt=x", "explain.what=[grid,gradcam]", "explain.cam_method=gradcam++"],
                                  ["train.class_weights=auto", "train.balanced_sampler=true", "train.precision=auto"],
                                  ["+mode=lr_find", "lr_find.rule=min_over_10"]])
def test_the_design_card_commands_pass_the_check(args):
    """The checks refuse nonsense only: the card's commands compose and validate."""
    from inat.cli import check_command, check_overrides, rewrite_shorthand

    args = rewrite_shorthand(args)
    assert check_overrides(args) is None and check_command(args) is None


def test_validation_also_guards_library_and_sweep_trial_runs(capsys):
    """``inat.run`` validates too, so a sweep trial's sampled value cannot slip past run.py's check."""
    from omegaconf import OmegaConf

    from inat.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.train.batch_size = -5
    fails_cleanly(capsys, lambda: inat.run(cfg), "train.batch_size must be >= 1, got -5")


# --------------------------------------------------------------------------- sweeps (causes 7, 13)

SWEEP_CASES = [
    (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=-3"], "n_trials must be an integer >= 1, got -3"),
    (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=0"], "n_trials must be an integer >= 1, got 0"),
    (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=abc"], "n_trials"),
    (["hydra/sweeper=optuna", "train.lr=interval(0.1,0.001)"], "train.lr: interval(0.1, 0.001) is empty or inverted"),
    (["hydra/sweeper=optuna", "model.dropout=interval(0.5,0.5)"], "model.dropout: interval(0.5, 0.5)"),
    (["hydra/sweeper=optuna", "train.lr=tag(log,interval(0,0.1))"], "needs LOW > 0"),
    (["hydra/sweeper=optuna", "train.batch_size=choice(0,8)", "train.epochs=0"], "train.epochs must be >= 1"),
]


@pytest.mark.parametrize("args,needle", SWEEP_CASES, ids=[c[0][-1] for c in SWEEP_CASES])
def test_bad_sweep_is_refused_before_optuna_starts(capsys, monkeypatch, args, needle):
    cli_fails(capsys, monkeypatch, ["-m", *args], needle)


def test_sweeper_yaml_params_are_checked_too():
    """An inverted interval in a sweeper preset (``hydra.sweeper.params``), not on the command line."""
    from inat.sweep.space import sweep_errors

    errors = sweep_errors(20, {"train.lr": "tag(log, interval(0.01, 0.0003))", "act": "choice(relu, gelu)"}, [])
    assert errors == ["train.lr: interval(0.01, 0.0003) is empty or inverted; write interval(LOW, HIGH) with "
                      "LOW < HIGH, e.g. interval(0.0003, 0.01)."]
    assert sweep_errors(20, {"train.lr": "tag(log, interval(0.0003, 0.01))"}, ["act=choice(relu,gelu)"]) == []


# --------------------------------------------------------------------------- end to end through run.py

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """A dataset root and a folder (not a checkpoint) for the few real ``run.py`` runs."""
    base = tmp_path_factory.mktemp("e2e")
    root = make_dataset(base / "data", n_classes=2, n_train=3, n_test=1, size=16)
    return base, root


E2E_CASES = [
    ["train.epochs=abc"], ["act=mishh"], ["+mode=bogus"], ["train.batch_size=0"], ["optim.schedule=bogus"],
    ["-m", "hydra/sweeper=optuna", "train.lr=interval(0.1,0.001)"], ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=-3"],
    ["+mode=test", "ckpt=DIR"],
]


@pytest.mark.parametrize("args", E2E_CASES, ids=[" ".join(a) for a in E2E_CASES])
def test_run_py_exits_2_with_one_sentence_and_writes_nothing(e2e, args):
    base, root = e2e
    out = base / ("out_" + str(abs(hash(tuple(args)))))
    args = [a.replace("DIR", str(base)) for a in args]
    hydra_dir = [f"hydra.sweep.dir={out}"] if "-m" in args else [f"hydra.run.dir={out}"]
    proc = run_cli([f"data.root={root}", *FAST, *args, *hydra_dir], cwd=base, timeout=120)  # the case wins
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error(proc.stderr)
    assert "is a directory" in line if "ckpt=" in " ".join(args) else True
    # Refused before anything ran: no run folder, no sweep database.
    assert not out.exists() or not any(p.is_file() and p.suffix in {".json", ".pt", ".db", ".csv"} for p in out.rglob("*"))
