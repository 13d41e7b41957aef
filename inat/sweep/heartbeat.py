"""Trial heartbeats: how a sweep finds the trial of a worker that died, and trains it again.

Optuna 2.10 can fail a RUNNING trial whose heartbeat is older than the storage's grace period
and enqueue a copy with the same parameters (``RDBStorage(heartbeat_interval=, grace_period=,
failed_trial_callback=RetryFailedTrialCallback(max_retry=))``), but only ``study.optimize``
starts the thread that records heartbeats, and Hydra's sweeper asks and tells instead. So the
trial process records its own: ``beating`` around a trial's training, a daemon thread that
dies with the process, which is the point (``kill -9`` stops the heartbeat and nothing else has
to be told). It works wherever the trial runs (the sweeper's own process, a joblib worker, a
submitit job), since it needs only the storage URL, the study name and the trial number.

The sweeper's side: its study is opened through ``inat.sweep.study.rdb_storage`` (interval,
grace = 2 x interval, the retry callback), and ``fail_stale`` runs before each ask, so the next
worker that asks fails the dead trial and its retry is the trial that worker trains next.
In-memory and Redis storages have no heartbeat: nothing changes for them.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
import warnings
from typing import Any, Iterator, List, Optional

from inat.sweep.study import database_url, engine_kwargs, hide_password

log = logging.getLogger(__name__)

RETRIED = "failed_trial"  # Optuna's system attr on a retry copy: the number of the first failed trial
FIRST_BEAT_WAIT_S = 30.0  # how long a trial waits for its first heartbeat before training without one


def heartbeat_storage(url: Optional[str]) -> bool:
    """True for the storages Optuna records heartbeats in (SQLAlchemy URLs: SQLite, PostgreSQL, MySQL)."""
    return database_url(url)


def is_retry(trial: Any) -> bool:
    """True for a copy of a failed trial enqueued by the retry callback (it does not use up the trial budget)."""
    return RETRIED in trial.system_attrs


def _backend(study: Any) -> Any:
    """The study's storage below Optuna's per-process cache, which never sees other workers' writes to our trials."""
    return getattr(study._storage, "_backend", study._storage)


def finished_in_storage(study: Any, trial: Any) -> bool:
    """True when the storage already holds ``trial`` as finished (e.g. failed as stale by another worker)."""
    return _backend(study).get_trial(trial._trial_id).state.is_finished()


def retry(study: Any, trial_id: int) -> None:
    """Hand a failed trial to the storage's retry callback (enqueues a copy, up to ``sweep.retries`` times)."""
    import optuna

    callback = getattr(_backend(study), "failed_trial_callback", None)
    if callback is not None:
        with warnings.catch_warnings():  # its add_trial and create_trial are "experimental" in Optuna 2.10
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback(study, copy.deepcopy(_backend(study).get_trial(trial_id)))


def grace_seconds(backend: Any) -> float:
    """How long a trial's heartbeat may be silent before the trial counts as dead (Optuna's default: 2 beats)."""
    return backend.grace_period or 2 * backend.heartbeat_interval


def stale_trial_ids(backend: Any, study_id: int) -> List[int]:
    """RUNNING trials of the study whose last heartbeat is older than the grace period.

    Optuna 2.10's ``RDBStorage._get_stale_trial_ids`` does the same with
    ``(now - heartbeat).seconds``, and on PostgreSQL ``now()`` is the start of the reading
    transaction: a heartbeat another worker committed after that start is in the "future", the
    difference is negative, its ``.seconds`` is about 86,399, and a healthy trial is failed
    (seen as a seventh trial in the three-worker PostgreSQL test). Here the age is
    ``total_seconds()``, and a heartbeat newer than the clock counts as fresh.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState
    from sqlalchemy import func, orm

    grace = grace_seconds(backend)
    stale = []
    with _create_scoped_session(backend.scoped_session, True) as session:
        now = session.execute(func.now()).scalar().replace(tzinfo=None)  # PostgreSQL: aware; the column: naive
        running = (session.query(models.TrialModel).options(orm.selectinload(models.TrialModel.heartbeats))
                   .filter(models.TrialModel.state == TrialState.RUNNING)
                   .filter(models.TrialModel.study_id == study_id).all())
        for trial in running:
            if trial.heartbeats and (now - trial.heartbeats[0].heartbeat).total_seconds() > grace:
                stale.append(trial.trial_id)
    return stale


def fail_stale(study: Any) -> List[int]:
    """Fail the study's RUNNING trials whose heartbeat stopped, queue their retries; return their numbers.

    Optuna's own ``fail_stale_trials`` does the same but stops at the first trial another worker
    failed a moment earlier (its ``set_trial_state`` raises RuntimeError), and then runs no
    callback at all, so the trials it did fail are never retried. Workers on one machine call
    this under the sweep folder's ask lock; on several machines the race is real, hence the loop.
    Stale trials come from :func:`stale_trial_ids`, not Optuna's ``_get_stale_trial_ids``.
    """
    import optuna

    storage = study._storage
    if not storage.is_heartbeat_enabled():
        return []
    backend = _backend(study)
    failed = []
    for trial_id in stale_trial_ids(backend, study._study_id):
        try:
            if storage.set_trial_state(trial_id, optuna.trial.TrialState.FAIL):
                failed.append(trial_id)
        except RuntimeError:  # already finished: another worker failed it first
            continue
    numbers = []
    for trial_id in failed:
        number = backend.get_trial_number_from_id(trial_id)
        numbers.append(number)
        log.warning(f"Trial {number}: no heartbeat for over {grace_seconds(backend)} s (its process died), marked FAIL; "
                    "a copy with the same parameters is queued unless it was retried enough (sweep.retries).")
        retry(study, trial_id)
    return numbers


def _beat(url: str, study_name: str, number: int, seconds: float, started: threading.Event,
          stop: threading.Event) -> None:
    """The heartbeat thread: open its own storage, find the trial, record a heartbeat every ``seconds``."""
    from optuna.storages import RDBStorage

    storage = None
    try:
        storage = RDBStorage(url, engine_kwargs=engine_kwargs(url), skip_compatibility_check=True)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
        storage.record_heartbeat(trial_id)
    except Exception as err:  # noqa: BLE001 - a trial trains without a heartbeat rather than not at all
        log.warning(f"Trial {number}: no heartbeat in {hide_password(url)} ({type(err).__name__}: {err}); "
                    "if this process dies, the trial stays RUNNING.")
        started.set()
        if storage is not None:
            storage.engine.dispose()
        return
    started.set()
    warned = False
    try:
        while not stop.wait(seconds):
            try:
                storage.record_heartbeat(trial_id)
                warned = False
            except Exception as err:  # noqa: BLE001 - a database hiccup: try again next beat
                if not warned:
                    log.warning(f"Trial {number}: heartbeat not recorded ({type(err).__name__}: {err}); retrying.")
                warned = True
    finally:
        storage.remove_session()
        storage.engine.dispose()


@contextlib.contextmanager
def beating(url: Optional[str], study_name: Optional[str], number: Optional[int], seconds: float) -> Iterator[bool]:
    """Record this trial's heartbeat in its study every ``seconds`` for the block; yields whether it does.

    A no-op (yields False) outside an Optuna sweep on a heartbeat storage: no URL, Redis, no
    study name or trial number, or ``seconds <= 0``. The first heartbeat is recorded before the
    block starts, so a trial killed while it decodes its data is found too.
    """
    if not heartbeat_storage(url) or not study_name or number is None or seconds <= 0:
        yield False
        return
    started, stop = threading.Event(), threading.Event()
    args = (str(url), str(study_name), int(number), float(seconds), started, stop)
    thread = threading.Thread(target=_beat, args=args, name=f"inat-heartbeat-{number}", daemon=True)
    thread.start()
    started.wait(FIRST_BEAT_WAIT_S)
    try:
        yield thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=10)
