"""Fault battery, part 3: a refused command leaves the run folder's record as it found it.

Hydra writes ``.hydra/`` before inat runs, so before ``inat.record`` a refused second training
or a refused resume left *its own* command as the folder's "reproduce this run" record.
Also here: Hydra flags that cannot be combined are one sentence, not Hydra's traceback.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, make_dataset, run_cli
from test_faults import assert_one_error, cli_fails

RECORD = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "split.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run folder and the command that made it."""
    root = tmp_path_factory.mktemp("record")
    data = make_dataset(root / "data", n_classes=2, n_train=6, n_test=2, size=24)
    run_dir = root / "run"
    args = [*FAST, "train.epochs=1", "train.then_test=false", f"data.root={data}", f"hydra.run.dir={run_dir}"]
    env = {"INAT_CACHE": str(root / "cache")}
    done = run_cli(args, env=env)
    assert done.returncode == 0, done.stderr
    return run_dir, args, env


def record_of(run_dir: Path) -> dict:
    return {name: (run_dir / name).read_bytes() for name in RECORD}


def test_a_refused_resume_keeps_the_record(trained):
    run_dir, args, env = trained
    before = record_of(run_dir)
    done = run_cli([*args, "resume=true", "train.lr=0.5"], env=env)
    assert done.returncode == 2, done.stderr
    assert_one_error(done.stderr, "differs")
    assert record_of(run_dir) == before
    assert b"train.lr=0.5" not in (run_dir / ".hydra" / "overrides.yaml").read_bytes()


def test_a_second_training_into_a_held_folder_keeps_the_record(trained):
    run_dir, args, env = trained
    before = record_of(run_dir)
    code = ("import time; from inat.runs import acquire_run_lock\n"
            f"with acquire_run_lock({str(run_dir)!r}):\n    print('locked', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = run_cli([*args, "train.lr=0.01"], env=env)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stderr
    assert_one_error(done.stderr, "in use", f"pid {holder.pid}")
    assert record_of(run_dir) == before


def test_a_command_that_trained_owns_the_new_record(tmp_path):
    """The other side of the rule: a fresh training over an old folder writes its own record."""
    data = make_dataset(tmp_path / "data", n_classes=2, n_train=6, n_test=2, size=24)
    run_dir = tmp_path / "run"
    env = {"INAT_CACHE": str(tmp_path / "cache")}
    base = [*FAST, "train.epochs=1", "train.then_test=false", f"data.root={data}", f"hydra.run.dir={run_dir}"]
    assert run_cli(base, env=env).returncode == 0
    done = run_cli([*base, "train.lr=0.01"], env=env)
    assert done.returncode == 0, done.stderr
    assert b"train.lr=0.01" in (run_dir / ".hydra" / "overrides.yaml").read_bytes()


@pytest.mark.parametrize("args, given", [
    (["-m", "--cfg", "hydra"], "-m and --cfg"), (["--cfg", "job", "--multirun"], "--cfg and -m"),
    (["--info", "-c", "job"], "--info and --cfg"), (["-m", "--info"], "-m and --info"),
])
def test_hydra_flags_that_exclude_each_other_are_one_sentence(capsys, monkeypatch, args, given):
    cli_fails(capsys, monkeypatch, ["data.root=x", *args], given, "cannot be given together")


def test_multirun_with_cfg_from_the_shell_is_one_sentence_and_exit_2():
    done = run_cli(["-m", "data.root=x", "--cfg", "hydra"])
    assert done.returncode == 2
    assert_one_error(done.stderr, "leave out -m")


def test_torchrun_without_a_run_folder_is_refused_before_hydra(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli_fails(capsys, monkeypatch, ["data.root=x"], "hydra.run.dir=RUN_DIR", "torchrun")


def test_torchrun_with_a_run_folder_passes_the_check(capsys, monkeypatch, tmp_path):
    from inat.cli import prepare_argv

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["run.py", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    prepare_argv()  # no SystemExit
