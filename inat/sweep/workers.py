"""``python -m inat.sweep.workers N -- OVERRIDES``: N sweep workers on this machine, one per GPU, one study.

Each worker is an ordinary ``python run.py -m hydra/sweeper=optuna hydra.sweeper.n_jobs=1
OVERRIDES`` process. All share the study's storage and the sweep folder (trial folders are
named by Optuna trial number, so they never clash), and each asks for its next trial as soon
as its last one ended: no barrier between batches (hydra #3091). What this command adds:

- one ``hydra.sweep.dir`` for all (the one given, else the config's default, resolved once);
- the storage, printed with the reason: ``hydra.sweeper.storage`` when given (a PostgreSQL
  server for workers on several machines, ``experiments/sweep/start_postgres.sh``), else the
  preset's SQLite file in the sweep folder, switched to WAL mode before the workers start (so
  readers do not block the writer), opened by every process with a long busy timeout;
- one trial budget: ``hydra.sweeper.n_trials=T`` means T new trials in total, not T per
  worker: the workers get ``sweep.max_trials`` = the study's trials so far + T
  (``inat.sweep.sweeper.ask_within``; retries of trials whose worker died come on top);
- a GPU per worker, ``CUDA_VISIBLE_DEVICES`` = the i-th visible GPU; with more workers than
  GPUs they are dealt round-robin (small models leave a GPU idle enough for two), on a machine
  without GPUs nothing is pinned; each worker gets cores / N torch threads unless
  ``train.threads`` is given;
- each worker's output in ``<sweep dir>/worker<i>.log``, with its trial starts and results
  echoed to the console as ``[worker i] ...``; the exit code is non-zero when a worker failed,
  naming it and its log; Ctrl-C or SIGTERM stops every worker (SIGTERM to its process group,
  SIGKILL after ``STOP_WAIT_S``).

A worker killed mid-trial leaves its trial RUNNING with a stale heartbeat: the next ask of any
worker fails it and trains a copy with the same parameters (``inat.sweep.heartbeat``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from omegaconf import OmegaConf, read_write

from inat.cli import check_overrides, command_errors, compose_command, fail, rewrite_shorthand
from inat.errors import InatError
from inat.runs import usable_cpus
from inat.sweep.study import SQLITE_TIMEOUT_S, hide_password, rdb_storage
from inat.sweep.sweeper import budget_count, check_dataset

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
SETS = ("hydra.sweep.dir", "hydra.sweeper.n_jobs")  # keys every worker gets from this command, one value for all
STOP_WAIT_S = 30.0  # after SIGTERM, how long a worker may take to stop before SIGKILL
POLL_S = 0.5  # how often the console echo reads the workers' logs
# Lines of a worker's log worth a console line: Hydra launching a trial, a trial's result, an
# error sentence, and the sweeper's own notes about a trial (failed, retried, stale, skipped).
_LAUNCH = re.compile(r"\[HYDRA\]\s+#(\d+) : ")
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\])+( - )?\s*")  # "[time][HYDRA] " or "[time][name][LEVEL] - "
_ECHO = re.compile(r"^(best val accuracy|error:)|\bTrial \d+ (failed|retries|was finished|is already|: no heartbeat)"
                   r"|Sweep budget|sweep\.max_trials=")


@dataclass
class Plan:
    """What ``run_workers`` starts: one command, environment and log per worker."""

    sweep_dir: Path
    storage: str
    storage_note: str
    study_name: str
    new_trials: int
    max_trials: int
    commands: List[List[str]]
    devices: List[Optional[str]]  # CUDA_VISIBLE_DEVICES per worker; None: not pinned (no GPU)
    threads: Optional[int]  # train.threads set per worker, None when the user gave it

    def log(self, i: int) -> Path:
        return self.sweep_dir / f"worker{i}.log"


def deal_devices(n: int, gpus: Sequence[str]) -> List[Optional[str]]:
    """The GPU of each of ``n`` workers: round-robin over ``gpus``; all None when there is none."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(n)]


def visible_gpus() -> List[str]:
    """This process's GPUs as ``CUDA_VISIBLE_DEVICES`` entries (the ones already visible, if it is set)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return given[:count] if given else [str(i) for i in range(count)]


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def refuse(overrides: Sequence[str]) -> Optional[str]:
    """One sentence for an override the workers command sets itself or cannot run under, else None."""
    for arg in overrides:
        key, value = _key(arg), arg.partition("=")[2]
        if arg.startswith("-") and arg not in ("-m", "--multirun"):
            return f"Only key=value overrides go after --, got '{arg}'."
        if key == "hydra/sweeper" and value != "optuna":
            return f"The workers run inat's Optuna sweeper; leave out hydra/sweeper={value}."
        if key == "hydra/launcher":
            return (f"Each worker trains its trials in its own process, one at a time; hydra/launcher={value} is for "
                    "a single sweep command (docs/sweep.md), so leave it out here.")
        if key == "hydra.sweeper.n_jobs" and value.strip() != "1":
            return (f"Each worker asks one trial at a time; leave out hydra.sweeper.n_jobs={value} "
                    "(start more workers instead).")
        if key == "sweep.max_trials":
            return ("The workers command sets sweep.max_trials from the trial budget; give the budget as "
                    "hydra.sweeper.n_trials=T (T new trials across all workers).")
    return None


def prepare_storage(url: str, study_name: str) -> int:
    """Make the storage ready for N workers at once; return the study's trials so far (as the budget counts).

    SQLite: WAL mode on the file (persistent, so once is enough), then Optuna's tables, so the
    workers do not race to create them.
    """
    from sqlalchemy.engine import make_url

    try:
        if url.startswith("sqlite"):
            path = make_url(url).database
            if not path or path == ":memory:":
                raise InatError(f"hydra.sweeper.storage={url} is in one process's memory; the workers need a file "
                                "or a database server to share the study.")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as con:
                con.execute("PRAGMA journal_mode=WAL")
        storage = rdb_storage(url)
        if isinstance(storage, str):  # Redis: no tables to create, count through a study
            import optuna

            summaries = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
            return int(summaries.get(study_name, 0))
        try:
            return budget_count(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False))
        except KeyError:  # no such study yet: the first worker creates it
            return 0
        finally:
            storage.engine.dispose()  # this command holds no connection while the workers run
    except InatError:
        raise
    except Exception as err:  # noqa: BLE001 - unreachable server, read-only file, ...
        text = str(getattr(err, "orig", None) or err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise InatError(f"Could not open the study storage {hide_password(url)} ({first}); check that it is "
                        "reachable and writable.") from None


def plan_workers(n: int, overrides: Sequence[str], python: str = sys.executable,
                 gpus: Optional[Sequence[str]] = None) -> Plan:
    """Check the command, pick the sweep folder and storage, prepare the storage, and build N worker commands."""
    if n < 1:
        raise InatError(f"The number of workers must be at least 1, got {n}.")
    overrides = [a for a in overrides if a not in ("-m", "--multirun")]
    message = refuse(overrides) or check_overrides(list(overrides))
    if message:
        raise InatError(message)
    overrides = [a for a in overrides if _key(a) != "hydra/sweeper"]
    # The sweep's composed config, sweep expressions left out (composed once, checked as run.py would)
    cfg, sweeps = compose_command(rewrite_shorthand(["hydra/sweeper=optuna", *overrides]), multirun=True)
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        errors = command_errors(cfg, sweeps, multirun=True)
        if errors:
            raise InatError(errors[0])
    swept = [_key(line) for line in sweeps]
    given = {_key(a) for a in overrides}
    sweep_dir = str(cfg.hydra.sweep.dir)  # resolved once: ${now:...} must not differ between workers
    with read_write(cfg.hydra):
        cfg.hydra.sweep.dir = sweep_dir  # so the preset's storage, ${hydra.sweep.dir}/optuna.db, names it too
    url = OmegaConf.select(cfg, "hydra.sweeper.storage")
    study_name = str(OmegaConf.select(cfg, "hydra.sweeper.study_name") or "")
    new_trials = int(cfg.hydra.sweeper.n_trials)
    if not url:
        raise InatError("hydra.sweeper.storage=null gives every worker its own in-memory study; leave it out "
                        "(SQLite in the sweep folder) or give a database URL the workers share.")
    url = str(url)
    if "hydra.sweeper.storage" in given:
        note = "hydra.sweeper.storage, as given"
    else:
        note = ("SQLite in the sweep folder, as no hydra.sweeper.storage was given; for workers on several machines "
                "give a database server, e.g. experiments/sweep/start_postgres.sh")
    if url.startswith("sqlite"):
        note += f"; WAL mode, {SQLITE_TIMEOUT_S:g} s busy timeout, on a local disk (not NFS)"
    elif url.startswith("redis"):
        note += "; Redis keeps no heartbeats, so a trial whose worker dies stays RUNNING"
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    if not any(key in swept or key in params for key in ("data.root", "data.manifest")):
        check_dataset(cfg.data)  # once here (a first download shows on the console), not in N logs
    so_far = prepare_storage(url, study_name)
    gpus = visible_gpus() if gpus is None else list(gpus)
    threads = None if "train.threads" in given else max(1, usable_cpus() // n)
    kept = [a for a in overrides if _key(a) not in SETS]
    command = [python, str(RUN_PY), "-m", "hydra/sweeper=optuna", *kept, f"hydra.sweep.dir={sweep_dir}",
               "hydra.sweeper.n_jobs=1", f"sweep.max_trials={so_far + new_trials}"]
    if threads is not None:
        command.append(f"train.threads={threads}")
    return Plan(Path(sweep_dir), url, note, study_name, new_trials, so_far + new_trials, [command] * n,
                deal_devices(n, gpus), threads)


class _Stop(Exception):
    """SIGTERM to the workers command, raised in its main loop like Ctrl-C's KeyboardInterrupt."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def _stop(workers: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every live worker's process group (its trials' children too); SIGKILL what outlives STOP_WAIT_S."""
    for proc in workers:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_WAIT_S
    for proc in workers:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


class _Echo:
    """Reads a worker's log as it grows and prints its notable lines with a ``[worker i]`` prefix."""

    def __init__(self, i: int, path: Path) -> None:
        self.prefix, self.path = f"[worker {i}]", path
        self.offset = path.stat().st_size if path.exists() else 0
        self.rest = b""
        self.trials: List[int] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            launch = _LAUNCH.search(line)
            if launch:
                self.trials.append(int(launch[1]))
                print(f"{self.prefix} trial {launch[1]} started", flush=True)
            elif _ECHO.search(line):
                print(f"{self.prefix} {_LOG_PREFIX.sub('', line)}", flush=True)

    def last_line(self) -> str:
        try:
            lines = [ln for ln in self.path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or [""])[-1].strip()


def run_workers(plan: Plan) -> int:
    """Start the plan's workers, echo their progress, wait for all; return the command's exit code."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    workers: List[subprocess.Popen] = []
    echoes: List[_Echo] = []
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for i, (command, device) in enumerate(zip(plan.commands, plan.devices)):
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the console echo reads the log as it grows
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            log = plan.log(i)
            with open(log, "ab") as fh:
                fh.write(f"=== {dt.datetime.now():%Y-%m-%d %H:%M:%S} worker {i}: {' '.join(command)}\n".encode())
                fh.flush()
                echoes.append(_Echo(i, log))  # from here on: a rerun appends to the log, echoed from its new end
                # Its own session: Ctrl-C reaches only this command, which stops the workers in order.
                workers.append(subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True))
            where = f"GPU {device}" if device is not None else "no GPU"
            threads = f", {plan.threads} torch thread{'s' * (plan.threads != 1)}" if plan.threads else ""
            print(f"worker {i}: {where}{threads}, pid {workers[-1].pid}, log {log}", flush=True)
        while any(w.poll() is None for w in workers):
            for echo in echoes:
                echo.poll()
            time.sleep(POLL_S)
    except (KeyboardInterrupt, _Stop) as err:
        print(f"Stopping {sum(w.poll() is None for w in workers)} workers ...", flush=True)
        _stop(workers)
        return 143 if isinstance(err, _Stop) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for echo in echoes:
        echo.poll()
    failed = [(i, w.returncode) for i, w in enumerate(workers) if w.returncode != 0]
    for i, (w, echo) in enumerate(zip(workers, echoes)):
        print(f"worker {i}: exit {w.returncode}, trials {echo.trials or 'none'}", flush=True)
    for i, code in failed:
        print(f"error: worker {i} failed (exit {code}); its log: {plan.log(i)}: {echoes[i].last_line()}",
              file=sys.stderr, flush=True)
    if not failed:
        return 0
    return 2 if all(code == 2 for _, code in failed) and len(failed) == len(workers) else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m inat.sweep.workers N -- OVERRIDES``: bad input is one ``error:`` sentence and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m inat.sweep.workers", description=__doc__.split("\n\n")[0],
                                     epilog="Example: python -m inat.sweep.workers 4 -- data.root=D train.epochs=10 "
                                            "hydra.sweeper.n_trials=40")
    parser.add_argument("workers", help="how many sweep workers to start (one per GPU)")
    ns = parser.parse_args(head)
    try:
        n = int(ns.workers)
    except ValueError:
        fail(f"The number of workers must be a whole number, got '{ns.workers}'.")
    try:
        plan = plan_workers(n, overrides)
    except InatError as err:
        fail(str(err))
    print(f"storage: {hide_password(plan.storage)} ({plan.storage_note})", flush=True)
    print(f"sweep folder {plan.sweep_dir}: study {plan.study_name} holds {plan.max_trials - plan.new_trials} "
          f"trials; {plan.new_trials} more across {len(plan.commands)} workers (sweep.max_trials={plan.max_trials})",
          flush=True)
    sys.exit(run_workers(plan))


if __name__ == "__main__":
    main()
