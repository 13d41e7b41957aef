"""Fault battery, part 3: numbers a user is asked to trust (temperature, lr_find, sweeps, ckpt hints).

Found by a hostile-input battery: a temperature fitted on one validation image (T = 759,314)
that flattened every probability; a stored T = 0 or -1 that gave NaN or a reversed ranking
with exit 0; ``lr_find.*`` keys with no range (``smoothing=1`` a ZeroDivisionError); two
sweeps creating one SQLite study at the same moment (a raw SQLAlchemy traceback); and a
``ckpt=<folder>`` hint that doubled ``checkpoints/``. Same promise as parts 1 and 2: one
``error:`` sentence, exit 2, no traceback, nothing half-written.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, REPO, make_dataset, run_cli
from inat.checkpoint import load_checkpoint, save_checkpoint
from test_faults import assert_one_error, cli_fails, fails_cleanly

CLASSES = ["class_0", "class_1", "class_2"]


def train_run(base: Path, n_train: int) -> Path:
    """A one-epoch scratch run in-process on ``n_train`` images per class; returns the run folder."""
    from inat.config import Config
    from inat.training import fit

    root = make_dataset(base / "data", n_classes=3, n_train=n_train, n_test=2, size=32)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(
        [f"data.root={root}", *FAST, "train.epochs=1", f"data.cache_dir={base / 'cache'}"]))
    torch.set_num_threads(1)
    fit(cfg, base / "run")
    return base / "run"


@pytest.fixture(scope="module")
def small_val_run(tmp_path_factory):
    """30 training images: a validation split of 6, too few to fit a temperature on."""
    return train_run(tmp_path_factory.mktemp("smallval"), n_train=10)


# --------------------------------------------------------------------------- 1. the temperature fit

def test_a_tiny_validation_split_gets_no_temperature_and_says_so_once(tmp_path, capsys):
    run = train_run(tmp_path, n_train=10)
    printed = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", printed.out + printed.err) if "temperature" in line]
    assert len(lines) == 1 and "6 validation images" in lines[0] and "fewer than 20" in lines[0], lines
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / "checkpoints" / name)
        assert state["temperature"] is None, (name, state["temperature"])  # no scaling, recorded as such
        assert "fewer than 20" in state["temperature_note"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["temperature"] is None and summary["temperature_note"] == lines[0].strip()


def test_predict_on_that_run_is_not_flattened(small_val_run, tmp_path):
    """The symptom: with T in the thousands every class printed the same probability."""
    from inat.predict import predict_images

    data = small_val_run.parent / "data"
    result = predict_images(small_val_run / "checkpoints" / "best.pt", [data / "val"], tmp_path, echo=False, workers=1)
    assert result.temperature is None
    probs = [r["probability"] for r in result.records]
    assert max(probs) > 1 / 3 + 0.01, probs


def test_test_mode_fallback_follows_the_same_rule(small_val_run, capsys):
    """A checkpoint without a temperature (older runs): test mode's fit on val refuses the same way, once."""
    from inat.holdout import checkpoint_or_val_temperature
    from inat.models import model_from_state

    state = load_checkpoint(small_val_run / "checkpoints" / "best.pt")
    del state["temperature"], state["temperature_note"]
    capsys.readouterr()
    t, source = checkpoint_or_val_temperature(state, model_from_state(state), torch.device("cpu"))
    out = capsys.readouterr().out
    assert t is None and source == "none", (t, source)
    assert out.count("temperature") == 1 and "fewer than 20" in out, out


def test_a_checkpoint_that_kept_the_raw_softmax_is_not_refitted_by_test_mode(small_val_run, capsys):
    from inat.holdout import checkpoint_or_val_temperature
    from inat.models import model_from_state

    state = load_checkpoint(small_val_run / "checkpoints" / "best.pt")
    capsys.readouterr()
    t, source = checkpoint_or_val_temperature(state, model_from_state(state), torch.device("cpu"))
    assert t is None and "fewer than 20" in source and capsys.readouterr().out == ""


def test_fitted_temperature_stays_inside_its_bounds():
    from inat.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, fit_temperature

    assert (MIN_TEMPERATURE, MAX_TEMPERATURE) == (0.05, 20.0)
    wrong = torch.tensor([[8.0, 0.0, 0.0]])  # one image, confidently wrong: the NLL optimum is T -> infinity
    assert 0.05 <= fit_temperature(wrong, torch.tensor([1])) <= 20.0
    assert fit_temperature(wrong, torch.tensor([1])) == pytest.approx(20.0)
    right = torch.tensor([[2.0, 0.0, 0.0]] * 5)  # all right: the optimum is T -> 0 (the search stops where NLL is flat)
    assert 0.05 <= fit_temperature(right, torch.zeros(5, dtype=torch.long)) < 1.0
    assert fit_temperature(torch.tensor([[0.5, 0.0]] * 5), torch.zeros(5, dtype=torch.long)) == pytest.approx(0.05)


def test_the_rule_refuses_a_fit_that_does_not_lower_validation_nll():
    from inat.calibration import MIN_CALIBRATION_IMAGES, choose_temperature

    n = MIN_CALIBRATION_IMAGES * 2
    flat = choose_temperature(torch.zeros(n, 3), torch.arange(n) % 3)  # constant logits: every T gives log 3
    assert flat.temperature is None and "did not lower the validation NLL" in flat.note
    n = MIN_CALIBRATION_IMAGES - 1
    few = choose_temperature(torch.randn(n, 3), torch.zeros(n, dtype=torch.long))
    assert few.temperature is None and f"fewer than {MIN_CALIBRATION_IMAGES}" in few.note
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (500,), generator=gen)
    overconfident = 6.0 * (torch.randn(500, 5, generator=gen) + 2.0 * torch.nn.functional.one_hot(y, 5))
    good = choose_temperature(overconfident, y)
    assert good.temperature == pytest.approx(3.0, rel=0.15) and "fitted on 500 validation images" in good.note


# --------------------------------------------------------------------------- 2. a stored temperature

def _with_temperature(good: Path, value, path: Path) -> Path:
    state = load_checkpoint(good)
    state["temperature"] = value
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    return path


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    from test_explain import make_checkpoint

    data = make_dataset(tmp_path_factory.mktemp("trust") / "data", n_classes=3, n_train=2, n_test=2, size=24)
    return data, make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt", data, classes=CLASSES)


BAD_T = {"zero": (0.0, "0.0"), "negative": (-1.0, "-1.0"), "nan": (math.nan, "nan"), "inf": (math.inf, "inf"),
         "text": ("2.5", "'2.5'"), "bool": (True, "True"), "list": ([2.0], "[2.0]")}


@pytest.mark.parametrize("kind", list(BAD_T))
def test_stored_temperature_must_be_a_positive_finite_number(capsys, plain_ckpt, tmp_path, kind):
    from inat.predict import predict_images

    value, shown = BAD_T[kind]
    data, good = plain_ckpt
    bad = _with_temperature(good, value, tmp_path / "bad.pt")
    fails_cleanly(capsys, lambda: predict_images(bad, [data / "val"], tmp_path / "out", echo=False, workers=1),
                  str(bad), f"temperature {shown}", "finite number > 0")
    assert not (tmp_path / "out").exists()


def test_stored_temperature_is_refused_by_test_mode(capsys, plain_ckpt, tmp_path):
    from inat.holdout import test_checkpoint

    _, good = plain_ckpt
    bad = _with_temperature(good, -1.0, tmp_path / "bad.pt")
    fails_cleanly(capsys, lambda: test_checkpoint(bad, tmp_path / "out", progress=False), str(bad), "temperature -1.0")
    assert not (tmp_path / "out").exists()


def test_zero_temperature_from_the_command_line_is_one_sentence(plain_ckpt, tmp_path):
    data, good = plain_ckpt
    bad = _with_temperature(good, 0.0, tmp_path / "bad.pt")
    out = tmp_path / "out"
    r = run_cli(["+mode=predict", f"ckpt={bad}", f"predict.inputs=[{data / 'val'}]", f"hydra.run.dir={out}",
                 "predict.workers=1"])
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert_one_error(r.stderr, str(bad), "temperature 0.0")
    assert "predictions" not in " ".join(p.name for p in out.rglob("*"))


def test_a_valid_stored_temperature_still_loads(plain_ckpt, tmp_path):
    _, good = plain_ckpt
    for value in (None, 1.7, np.float64(0.5), 3):
        assert load_checkpoint(_with_temperature(good, value, tmp_path / "ok.pt"))["temperature"] == value


# --------------------------------------------------------------------------- 3. lr_find ranges

LR_FIND_CASES = [
    ("lr_find.smoothing=1", "< 1"), ("lr_find.smoothing=1.5", "< 1"), ("lr_find.smoothing=-0.1", ">= 0"),
    ("lr_find.smoothing=nan", ">= 0"), ("lr_find.diverge=0", "> 1"), ("lr_find.diverge=1", "> 1"),
    ("lr_find.diverge=-4", "> 1"), ("lr_find.diverge=inf", "> 1"), ("lr_find.start_lr=0", "> 0"),
    ("lr_find.start_lr=-1e-6", "> 0"), ("lr_find.end_lr=0", "> 0"), ("lr_find.end_lr=inf", "> 0"),
    ("lr_find.steps=0", ">= 8"), ("lr_find.steps=7", ">= 8"), ("lr_find.steps=-1", ">= 8"),
]


@pytest.mark.parametrize("override,valid", LR_FIND_CASES, ids=[c[0] for c in LR_FIND_CASES])
def test_lr_find_key_out_of_range_names_key_and_range(capsys, monkeypatch, override, valid):
    key = override.split("=")[0]
    cli_fails(capsys, monkeypatch, ["+mode=lr_find", override], f"error: {key} must be", valid)


def test_lr_find_ramp_must_go_up(capsys, monkeypatch):
    cli_fails(capsys, monkeypatch, ["+mode=lr_find", "lr_find.start_lr=0.1", "lr_find.end_lr=0.01"],
              "lr_find.start_lr must be below lr_find.end_lr", "0.1", "0.01")


def test_lr_find_rule_choices_are_written_once():
    """The valid rules and their descriptions come from one table, so they cannot drift apart."""
    from inat.config import CHOICES
    from inat.lr_find import RULES

    assert tuple(RULES) == CHOICES["lr_find.rule"]


# --------------------------------------------------------------------------- 4. two sweeps, one new SQLite study

# A sitecustomize for the two sweep processes: each holds its first optuna.create_study until
# both have reached it, so the two create the fresh SQLite file within a millisecond of each
# other every time (without it the race depends on start-up jitter).
BARRIER = textwrap.dedent("""
    import os, time, optuna
    _create, _held = optuna.create_study, []
    def create_study(*args, **kwargs):
        if not _held:
            _held.append(1)
            gate = os.environ["INAT_TEST_BARRIER"]
            open(os.path.join(gate, str(os.getpid())), "w").close()
            deadline = time.time() + 120
            while len(os.listdir(gate)) < 2 and time.time() < deadline:
                pass  # spin, not sleep: a sleeping waiter wakes up to a millisecond late
        return _create(*args, **kwargs)
    optuna.create_study = create_study
""")


def test_two_sweeps_creating_one_sqlite_study_at_once(tmp_path):
    import optuna

    root = make_dataset(tmp_path / "data", n_classes=3, n_train=4, n_test=1, size=24)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BARRIER)
    gate = tmp_path / "gate"
    gate.mkdir()
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
           "INAT_TEST_BARRIER": str(gate), "INAT_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [sys.executable, str(REPO / "run.py"), "-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweeper.n_trials=1", f"data.root={root}", *FAST, "train.epochs=1", "filters=same", "aug=none",
            "train.batch_size=8"]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert "Traceback" not in out + err and "IntegrityError" not in out + err, err[-3000:]
        assert p.returncode == 0, err[-3000:]
    assert len(os.listdir(gate)) == 2  # both reached the barrier: the race really happened
    names = [re.search(r"Study (\S+) in ", out + err).group(1) for out, err in outputs]
    assert names[0] == names[1]
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert len(optuna.get_all_study_summaries(f"sqlite:///{sweep_dir}/optuna.db")) == 1
    assert sorted(t.number for t in study.trials) == [0, 1]  # one trial from each sweep, in the one study


def test_study_creation_retries_a_lost_race_then_gives_one_sentence(capsys, monkeypatch, tmp_path):
    """Forced: the first create fails as the losing process's does; a storage that keeps failing is one sentence."""
    import optuna
    import sqlalchemy.exc

    from inat.sweep.study import CREATE_ATTEMPTS, open_study

    real, calls = optuna.create_study, []

    def lose_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna, "create_study", lose_once)
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = open_study("s", url, direction="maximize")
    assert study.study_name == "s" and len(calls) == 2

    def always(*args, **kwargs):
        calls.append(1)
        raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))

    monkeypatch.setattr(optuna, "create_study", always)
    calls.clear()
    fails_cleanly(capsys, lambda: open_study("s", url, direction="maximize"), "Could not create or load", url,
                  f"{CREATE_ATTEMPTS} attempts")
    assert len(calls) == CREATE_ATTEMPTS


# --------------------------------------------------------------------------- 5. ckpt=<a folder>

@pytest.mark.parametrize("where", ["run_dir", "checkpoints_dir"])
@pytest.mark.parametrize("present", ["best.pt", "last.pt"])
def test_ckpt_folder_hint_names_a_file_that_exists(capsys, plain_ckpt, tmp_path, where, present):
    _, good = plain_ckpt
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / present).write_bytes(good.read_bytes())
    folder = run if where == "run_dir" else run / "checkpoints"
    line = fails_cleanly(capsys, lambda: load_checkpoint(folder), f"'{folder}' is a directory")
    hint = re.findall(r"(/\S+?\.pt)\b", line)[-1]  # the path the sentence suggests
    assert Path(hint) == run / "checkpoints" / present and Path(hint).is_file(), line
    assert "checkpoints/checkpoints" not in line


@pytest.mark.parametrize("where", ["run_dir", "checkpoints_dir"])
def test_ckpt_folder_without_a_checkpoint_does_not_double_the_folder(capsys, tmp_path, where):
    folder = tmp_path / "run" / ("checkpoints" if where == "checkpoints_dir" else "")
    folder.mkdir(parents=True, exist_ok=True)
    line = fails_cleanly(capsys, lambda: load_checkpoint(folder), "is a directory", "no best.pt or last.pt")
    assert "checkpoints/checkpoints" not in line
