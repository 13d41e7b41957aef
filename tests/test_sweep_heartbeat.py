"""Heartbeats: a trial whose process died is failed by the next ask and retried with its parameters.

Units on a SQLite study (a heartbeat is made old by rewriting its row, so nothing sleeps for a
grace period): the trial process's heartbeat thread, ``fail_stale`` with the retry callback, its
retry limit and a race with another worker. Then the real thing: a sweep process SIGKILLed
mid-training, and a second sweep process on the same storage that fails and retrains its trial.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, make_dataset


def new_study(tmp_path: Path, retries: int = 1, heartbeat: float = 1.0):
    import optuna

    from inat.sweep.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/optuna.db"
    return url, open_study("s", url, heartbeat_seconds=heartbeat, retries=retries, direction="maximize")


def ask_with_params(study):
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)  # sampled values: the retry must carry them
    trial.suggest_categorical("act", ["relu", "gelu"])
    return trial


def heartbeats(folder: Path) -> dict:
    """Trial number -> last heartbeat (SQLite's text timestamp) in ``folder/optuna.db``; {} before the tables exist."""
    try:
        with contextlib.closing(sqlite3.connect(folder / "optuna.db", timeout=30)) as con:
            return dict(con.execute("SELECT t.number, h.heartbeat FROM trial_heartbeats h JOIN trials t "
                                    "USING (trial_id)"))
    except sqlite3.OperationalError:
        return {}


def age_heartbeats(folder: Path, seconds: int = 60) -> None:
    """Make every recorded heartbeat ``seconds`` old, as if its process had died that long ago."""
    with contextlib.closing(sqlite3.connect(folder / "optuna.db", timeout=30)) as con:
        con.execute(f"UPDATE trial_heartbeats SET heartbeat = datetime('now', '{-seconds:+d} seconds')")
        con.commit()


def test_storage_gets_interval_grace_and_retry_callback(tmp_path):
    import optuna

    from inat.sweep.study import SQLITE_TIMEOUT_S, rdb_storage

    storage = rdb_storage(f"sqlite:///{tmp_path}/a.db", heartbeat_seconds=0.4, retries=2)
    assert (storage.heartbeat_interval, storage.grace_period) == (1, 1)  # Optuna wants whole seconds
    assert isinstance(storage.failed_trial_callback, optuna.storages.RetryFailedTrialCallback)
    assert storage.failed_trial_callback._max_retry == 2
    assert storage.engine_kwargs["connect_args"]["timeout"] == SQLITE_TIMEOUT_S
    storage = rdb_storage(f"sqlite:///{tmp_path}/b.db", heartbeat_seconds=60, retries=0)
    assert (storage.heartbeat_interval, storage.grace_period, storage.failed_trial_callback) == (60, 120, None)
    assert not rdb_storage(f"sqlite:///{tmp_path}/c.db").is_heartbeat_enabled()
    assert rdb_storage(None, 60, 1) is None  # in-memory: nothing changes


def test_trial_process_records_its_heartbeat_while_it_trains(tmp_path):
    from inat.sweep.heartbeat import beating

    url, study = new_study(tmp_path)
    study.ask()
    trial = study.ask()
    with beating(url, "s", trial.number, 0.3) as on:
        assert on
        first = heartbeats(tmp_path)
        assert list(first) == [1]  # recorded before the block starts, for this trial only
        time.sleep(1.4)  # SQLite's CURRENT_TIMESTAMP has whole seconds
        assert heartbeats(tmp_path)[1] > first[1]
    last = heartbeats(tmp_path)[1]
    time.sleep(1.2)
    assert heartbeats(tmp_path)[1] == last  # the thread stopped with the block


def test_no_heartbeat_outside_a_database_sweep(tmp_path, caplog):
    from inat.sweep.heartbeat import beating

    for url, name, number in ((None, "s", 0), ("redis://localhost", "s", 0), ("sqlite:///x.db", None, 0),
                              ("sqlite:///x.db", "s", None)):
        with beating(url, name, number, 1.0) as on:
            assert on is False
    url, _ = new_study(tmp_path)
    with caplog.at_level(logging.WARNING, logger="inat.sweep.heartbeat"):
        with beating(url, "no_such_study", 0, 1.0) as on:  # trains without a heartbeat, says so
            assert on is False
    assert "no heartbeat" in caplog.text and "stays RUNNING" in caplog.text


def test_stale_trial_is_failed_and_retried_once_with_its_parameters(tmp_path):
    import optuna

    from inat.sweep.heartbeat import RETRIED, fail_stale, is_retry

    url, study = new_study(tmp_path, retries=1)
    trial = ask_with_params(study)
    study._storage.record_heartbeat(trial._trial_id)
    assert fail_stale(study) == []  # fresh heartbeat: alive
    age_heartbeats(tmp_path)
    assert fail_stale(study) == [0]
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert trials[1].params == trials[0].params and trials[1].system_attrs[RETRIED] == 0
    assert fail_stale(study) == []  # failed once, not twice

    retried = study.ask()  # the next ask trains the copy, with the same parameters
    assert retried.number == 1 and is_retry(retried) and retried.params == trials[0].params
    study._storage.record_heartbeat(retried._trial_id)
    age_heartbeats(tmp_path)
    assert fail_stale(study) == [1]  # the retry died too: sweep.retries=1, so no third copy
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "FAIL"]


def test_no_retry_with_zero_retries_and_none_without_heartbeat(tmp_path):
    from inat.sweep.heartbeat import fail_stale

    url, study = new_study(tmp_path, retries=0)
    study.ask()
    running = study.ask()  # never recorded a heartbeat (an old trial): Optuna leaves it alone
    study._storage.record_heartbeat(study.get_trials(deepcopy=False)[0]._trial_id)
    age_heartbeats(tmp_path)
    assert fail_stale(study) == [0]
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "RUNNING"]
    assert running.number == 1


def test_a_heartbeat_newer_than_the_readers_clock_is_fresh(tmp_path):
    """PostgreSQL's now() is the reading transaction's start, so another worker's heartbeat can be newer.

    Optuna's own check takes ``(now - heartbeat).seconds`` (~86,399 for -1 s) and fails that healthy trial.
    """
    from inat.sweep.heartbeat import fail_stale, stale_trial_ids

    url, study = new_study(tmp_path)
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    age_heartbeats(tmp_path, -5)  # 5 s in the reader's future
    backend = study._storage._backend
    assert backend._get_stale_trial_ids(study._study_id) == [trial._trial_id]  # Optuna's check: wrongly stale
    assert stale_trial_ids(backend, study._study_id) == []
    assert fail_stale(study) == []
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["RUNNING"]
    age_heartbeats(tmp_path, 60)
    assert fail_stale(study) == [0]  # and an old one is still stale


def test_a_trial_another_worker_failed_first_does_not_stop_the_others_retry(tmp_path, monkeypatch):
    """Optuna's fail_stale_trials would raise on trial 0 and never queue trial 1's retry."""
    import optuna

    from inat.sweep.heartbeat import fail_stale

    url, study = new_study(tmp_path)
    first, second = ask_with_params(study), ask_with_params(study)
    for t in (first, second):
        study._storage.record_heartbeat(t._trial_id)
    age_heartbeats(tmp_path)
    other = optuna.load_study(study_name="s", storage=url)  # another worker fails trial 0 after our look-up
    from inat.sweep import heartbeat

    stale = heartbeat.stale_trial_ids(study._storage._backend, study._study_id)
    other.tell(0, state=optuna.trial.TrialState.FAIL)
    monkeypatch.setattr(heartbeat, "stale_trial_ids", lambda backend, study_id: stale)
    assert fail_stale(study) == [1]
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "FAIL", "WAITING"]


# --------------------------------------------------------------------------- a worker killed mid-training


def sweep_command(sweep_dir: Path, data: Path, *extra: str) -> list:
    return [sys.executable, str(REPO / "run.py"), "-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}",
            f"data.root={data}", "sweep.prune=false", "sweep.heartbeat_seconds=1", "hydra.sweeper.n_trials=1",
            *FAST, *extra]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retrained(tmp_path):
    import optuna

    data = make_dataset(tmp_path / "data", n_classes=2, n_train=8, n_test=2, size=32)
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "INAT_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    epochs = "train.epochs=40"  # long enough that the kill lands mid-training, not after the last epoch
    worker = subprocess.Popen(sweep_command(sweep_dir, data, epochs), cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        metrics = sweep_dir / "0" / "metrics.csv"
        wait_for(lambda: metrics.is_file() and sweep_dir.joinpath("optuna.db").is_file() and heartbeats(sweep_dir),
                 240, "trial 0's first epoch and heartbeat", worker)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert not (sweep_dir / "0" / "summary.json").exists(), "trial 0 finished before it was killed"
    study = optuna.load_study(study_name="inat_part_a", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # what the dead worker left behind
    time.sleep(3.5)  # older than the grace period (2 x 1 s; Optuna compares whole seconds)

    # A second sweep process on the same storage: its first ask fails trial 0 and trains the copy.
    second = subprocess.run(sweep_command(sweep_dir, data, epochs, "sweep.max_trials=1"), cwd=REPO, env=env,
                            text=True, capture_output=True, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "Trial 0: no heartbeat" in out and "Trial 1 retries trial 0" in out, out[-3000:]
    study = optuna.load_study(study_name="inat_part_a", storage=f"sqlite:///{sweep_dir}/optuna.db")
    dead, retried = study.trials  # max_trials=1: the retry does not use up the budget, and nothing else ran
    assert (dead.state.name, retried.state.name) == ("FAIL", "COMPLETE")
    assert retried.params == dead.params and retried.system_attrs["failed_trial"] == 0
    summary = json.loads((sweep_dir / "1" / "summary.json").read_text())
    assert summary["epochs"] == 40 and retried.value == pytest.approx(summary["best_val_accuracy"])
    assert summary["config"]["train"]["lr"] == pytest.approx(dead.params["train.lr"])
    # the dead worker asked trial 0; the copy was trained by the second process
    assert dead.user_attrs["worker"].endswith(f":{worker.pid}")
    assert retried.user_attrs["worker"] != dead.user_attrs["worker"]
