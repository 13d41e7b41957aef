"""``python -m inat.sweep.workers``: N sweep workers, one study, one sweep folder, one trial budget.

The end-to-end test starts 2 real workers on a tiny generated dataset (this CPU machine pins no
GPU). Units cover what must hold whatever the timing: the trial budget under concurrent asks
(``ask_within``'s lock), retry copies and queued trials against the budget, ``_tell`` of a trial
another worker already finished, a lost job's retry, the GPU deal and the refused overrides.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import FAST, REPO, make_dataset

T = 4  # the trial budget of the 2-worker sweep


def sqlite_study(path: Path, name: str = "s", **kwargs):
    import optuna

    from inat.sweep.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_study(name, f"sqlite:///{path}", direction="maximize", **kwargs)


# --------------------------------------------------------------------------- the trial budget


def test_max_trials_stops_asking_once_the_study_holds_that_many(tmp_path):
    import optuna

    from inat.sweep.sweeper import ask_within

    study = sqlite_study(tmp_path / "optuna.db")
    lock = tmp_path / ".ask.lock"
    asked = [ask_within(study, 3, lock) for _ in range(3)]
    assert [t.number for t in asked] == [0, 1, 2]
    study.tell(asked[0], state=optuna.trial.TrialState.FAIL)
    assert ask_within(study, 3, lock) is None  # every state counts, FAIL and RUNNING too
    assert ask_within(study, 0, lock).number == 3  # 0 = no budget
    assert not lock.exists()  # the lock file goes with its release


def test_queued_trials_are_asked_and_retry_copies_do_not_count(tmp_path):
    import optuna

    from inat.sweep.heartbeat import RETRIED
    from inat.sweep.sweeper import ask_within, budget_count

    study = sqlite_study(tmp_path / "optuna.db")
    lock = tmp_path / ".ask.lock"
    first = ask_within(study, 2, lock)
    first.suggest_float("x", 0, 1)
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    # what RetryFailedTrialCallback queues for a failed trial
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=first.params,
                                        distributions=first.distributions, system_attrs={RETRIED: 0}))
    assert budget_count(study.get_trials(deepcopy=False)) == 1
    retry = ask_within(study, 1, lock)  # at the budget, but a queued retry is always trained
    assert retry is not None and retry.number == 1 and retry.params == first.params
    assert ask_within(study, 1, lock) is None
    assert ask_within(study, 2, lock).number == 2  # one more new trial fits: the copy did not count
    assert ask_within(study, 2, lock) is None


def _ask_until_full(url: str, lock: str, max_trials: int, out) -> None:
    import optuna

    from inat.sweep.sweeper import ask_within

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="s", storage=url)
    mine = []
    while (trial := ask_within(study, max_trials, Path(lock))) is not None:
        mine.append(trial.number)
    out.put(mine)


@pytest.mark.slow
def test_concurrent_workers_ask_exactly_max_trials(tmp_path):
    """Four processes asking as fast as they can on one SQLite study stop at exactly the budget."""
    db = tmp_path / "optuna.db"
    sqlite_study(db)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ask_until_full, args=(f"sqlite:///{db}", str(tmp_path / ".ask.lock"), 12, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    asked = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(n for mine in asked for n in mine) == list(range(12))
    assert len(sqlite_study(db).get_trials(deepcopy=False)) == 12


# --------------------------------------------------------------------------- telling


def fake_sweeper(max_failure_rate: float = 1.0):
    return SimpleNamespace(sweeper=SimpleNamespace(max_failure_rate=max_failure_rate))


def job(value: float = 0.0, error: Exception | None = None):
    from hydra.core.utils import JobReturn, JobStatus

    if error is not None:
        return JobReturn(status=JobStatus.FAILED, _return_value=error)
    return JobReturn(status=JobStatus.COMPLETED, _return_value=value)


def test_tell_skips_a_trial_another_worker_already_finished(tmp_path, caplog, monkeypatch):
    import optuna

    from inat.sweep import sweeper as sweeper_module
    from inat.sweep.sweeper import InatOptunaSweeper

    db = tmp_path / "optuna.db"
    mine = sqlite_study(db)
    stale, raced, fine = mine.ask(), mine.ask(), mine.ask()
    other = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")  # another worker's process
    other.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # it failed trial 0 as stale
    with caplog.at_level(logging.WARNING, logger="inat.sweep.sweeper"):
        InatOptunaSweeper._tell(fake_sweeper(), mine, [stale, fine], [job(0.5), job(0.75)], tmp_path)
        # the race: finished by the other worker between our look and our tell
        real, looks = sweeper_module.finished_in_storage, []

        def late(study, trial):
            looks.append(trial.number)
            return real(study, trial) if len(looks) > 1 else False

        monkeypatch.setattr(sweeper_module, "finished_in_storage", late)
        other.tell(raced.number, state=optuna.trial.TrialState.FAIL)
        InatOptunaSweeper._tell(fake_sweeper(), mine, [raced], [job(0.5)], tmp_path)
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
    assert [(t.state.name, t.value) for t in trials] == [("FAIL", None), ("FAIL", None), ("COMPLETE", 0.75)]
    assert "Trial 0 is already finished" in caplog.text and "Trial 1 was finished by another worker" in caplog.text


def test_a_lost_job_is_told_failed_and_retried(tmp_path):
    import optuna

    from inat.sweep.sweeper import InatOptunaSweeper

    study = sqlite_study(tmp_path / "optuna.db", heartbeat_seconds=60, retries=1)
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
    lost = RuntimeError("TerminatedWorkerError")
    InatOptunaSweeper._tell(fake_sweeper(), study, [trial], [job(error=lost)], tmp_path, retry_failed=True)
    failed, copy = study.get_trials(deepcopy=False)
    assert (failed.state, copy.state) == (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING)
    assert copy.params == failed.params and copy.system_attrs["failed_trial"] == 0
    again = study.ask()  # the copy, trained next; its job fails by itself this time (not lost)
    assert again.number == 1
    with pytest.raises(RuntimeError, match="TerminatedWorkerError"):  # max_failure_rate 0: the sweep still stops
        InatOptunaSweeper._tell(fake_sweeper(0.0), study, [again], [job(error=lost)], tmp_path)
    # failed by itself, not lost: not retried
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "FAIL"]


# --------------------------------------------------------------------------- the command's choices


def test_workers_are_dealt_gpus_round_robin():
    from inat.sweep.workers import deal_devices

    assert deal_devices(2, ["0", "1"]) == ["0", "1"]
    assert deal_devices(3, ["2", "5"]) == ["2", "5", "2"]  # more workers than GPUs: they share
    assert deal_devices(2, []) == [None, None]  # a CPU machine: nothing pinned


@pytest.mark.parametrize("args, needle", [
    (["two", "--", "train.epochs=1"], "whole number, got 'two'"),
    (["0", "--", "train.epochs=1"], "at least 1, got 0"),
    (["2", "--", "hydra/launcher=joblib"], "hydra/launcher=joblib is for a single sweep command"),
    (["2", "--", "hydra.sweeper.n_jobs=4"], "leave out hydra.sweeper.n_jobs=4"),
    (["2", "--", "sweep.max_trials=9"], "give the budget as hydra.sweeper.n_trials=T"),
    (["2", "--", "hydra/sweeper=basic"], "leave out hydra/sweeper=basic"),
    (["2", "--", "train.epohcs=1"], "did you mean 'train.epochs'"),
    (["2", "--", "hydra.sweeper.storage=null"], "its own in-memory study"),
])
def test_bad_input_is_one_sentence_and_exit_2(capsys, args, needle):
    from inat.sweep.workers import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_plan_shares_folder_storage_and_budget(tmp_path):
    import optuna

    from inat.sweep.workers import plan_workers

    data = make_dataset(tmp_path / "data", n_classes=2, n_train=4, n_test=1, size=32)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    study = sqlite_study(sweep_dir / "optuna.db", name="inat_part_a")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.ask()  # a study with 2 trials so far: 5 more means sweep.max_trials=7
    plan = plan_workers(3, [f"data.root={data}", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=5",
                            "hydra.sweeper.n_jobs=1", "-m"], python="PY", gpus=["0", "1"])
    assert plan.devices == ["0", "1", "0"] and plan.max_trials == 7 and plan.new_trials == 5
    assert plan.storage == f"sqlite:///{sweep_dir}/optuna.db"
    assert "as no hydra.sweeper.storage was given" in plan.storage_note
    (command,) = {tuple(c) for c in plan.commands}  # one command for all
    assert command[:4] == ("PY", str(REPO / "run.py"), "-m", "hydra/sweeper=optuna")
    for arg in (f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_jobs=1", "sweep.max_trials=7",
                f"train.threads={max(1, (os.cpu_count() or 1) // 3)}", "hydra.sweeper.n_trials=5"):
        assert command.count(arg) == 1, (arg, command)
    assert "-m" not in command[3:]
    with contextlib.closing(sqlite3.connect(sweep_dir / "optuna.db")) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_plan_picks_one_sweep_folder_when_none_is_given(tmp_path, monkeypatch):
    from inat.sweep.workers import plan_workers

    data = make_dataset(tmp_path / "data", n_classes=2, n_train=4, n_test=1, size=32)
    monkeypatch.chdir(tmp_path)  # the config's default folder, outputs/sweeps/<date>_<time>, lands here
    plan = plan_workers(2, [f"data.root={data}", "train.threads=1"], python="PY", gpus=[])
    assert re.fullmatch(r"outputs/sweeps/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", str(plan.sweep_dir)), plan.sweep_dir
    assert plan.storage == f"sqlite:///{plan.sweep_dir}/optuna.db"
    assert (tmp_path / plan.sweep_dir / "optuna.db").is_file()
    assert plan.devices == [None, None] and plan.threads is None  # train.threads given: kept
    assert plan.max_trials == 20  # the preset's n_trials, as a total


# --------------------------------------------------------------------------- two real workers


def workers_env(tmp_path: Path) -> dict:
    env = {**os.environ, "INAT_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.slow
def test_two_workers_share_one_study_folder_and_budget(tmp_path):
    import optuna

    from inat.run_folder import read_sweep
    from inat.sweep.analysis import load_sweep
    from inat.sweep.prune import should_stop

    data = make_dataset(tmp_path / "data", n_classes=2, n_train=8, n_test=2, size=32)
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "inat.sweep.workers", "2", "--", f"data.root={data}",
                           f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.n_trials={T}", "train.epochs=2",
                           "sweep.prune=false", *FAST], cwd=REPO, env=workers_env(tmp_path), text=True,
                          capture_output=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    storage = f"storage: sqlite:///{sweep_dir}/optuna.db (SQLite in the sweep folder, as no hydra.sweeper.storage"
    assert storage in proc.stdout
    assert "WAL mode" in proc.stdout and f"{T} more across 2 workers (sweep.max_trials={T})" in proc.stdout

    study = optuna.load_study(study_name="inat_part_a", storage=f"sqlite:///{sweep_dir}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(T))  # exactly T in total, none twice, none lost
    assert all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    assert sorted(int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()) == list(range(T))
    for t in trials:
        assert t.user_attrs["run_dir"] == str(sweep_dir / str(t.number))
        assert (sweep_dir / str(t.number) / "summary.json").is_file()

    # both workers trained trials: by the study (the asking process) and by each worker's log
    pids = [int(p) for p in re.findall(r"^worker \d: no GPU, pid (\d+), log ", proc.stdout, re.M)]
    assert len(pids) == 2
    by_worker = {pid: sorted(t.number for t in trials if t.user_attrs["worker"].endswith(f":{pid}")) for pid in pids}
    assert all(by_worker.values()) and sorted(sum(by_worker.values(), [])) == list(range(T)), by_worker
    for i, pid in enumerate(pids):
        launched = [int(n) for n in re.findall(r"\[HYDRA\]\s+#(\d+) : ", (sweep_dir / f"worker{i}.log").read_text())]
        assert launched == by_worker[pid], (i, launched, by_worker)
        assert f"[worker {i}] trial {launched[0]} started" in proc.stdout

    # the median rule reads every worker's trials from the shared folder (here all T must count)
    cfg = SimpleNamespace(sweep=SimpleNamespace(prune=True, prune_warmup_epochs=0, prune_min_trials=T),
                          train=SimpleNamespace(epochs=3))
    reason = should_stop(cfg, sweep_dir / "new", {"epoch": 1, "val_accuracy": -1.0})
    assert reason is not None and f"of {T} finished trials" in reason, reason
    # and the sweep analysis reads the folder as one sweep, with its study
    assert sorted(read_sweep(sweep_dir).trials) == list(range(T))
    swept = load_sweep(sweep_dir)
    assert swept.study is not None and len(swept.rows) == T and {r.state for r in swept.rows} == {"complete"}


@pytest.mark.slow
def test_sigterm_stops_every_worker_and_queues_their_trials_again(tmp_path):
    import optuna

    data = make_dataset(tmp_path / "data", n_classes=2, n_train=8, n_test=2, size=32)
    sweep_dir = tmp_path / "sweep"
    # 3000 tiny epochs: a minute or more, so both trials are mid-training when the signal comes
    proc = subprocess.Popen([sys.executable, "-m", "inat.sweep.workers", "2", "--", f"data.root={data}",
                             f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=20", "train.epochs=3000",
                             "sweep.prune=false", *FAST], cwd=REPO, env=workers_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not all((sweep_dir / str(n) / "metrics.csv").is_file() for n in (0, 1)):  # both workers training
            assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "Stopping 2 workers" in out
    pids = list(map(int, re.findall(r"^worker \d: no GPU, pid (\d+), log ", out, re.M)))
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # each stopped trial was told FAIL on the way out and a copy queued for the next command
    trials = optuna.load_study(study_name="inat_part_a", storage=f"sqlite:///{sweep_dir}/optuna.db").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING", "WAITING"], [t.state for t in trials]
    assert sorted(t.system_attrs["failed_trial"] for t in trials[2:]) == [0, 1]
    assert all(t.params == trials[t.system_attrs["failed_trial"]].params for t in trials[2:])
