"""Create-or-load an Optuna study safely when several processes start on one new storage at once.

``optuna.create_study(load_if_exists=True)`` is not atomic on a fresh SQLite file: each
process finds no tables, both issue ``CREATE TABLE`` (or both insert the schema version),
and the loser gets a raw SQLAlchemy ``OperationalError`` ("table studies already exists")
or ``IntegrityError`` (a UNIQUE constraint). Once the winner has committed, the schema and
the study exist, so the loser only has to load again: ``open_study`` retries a bounded
number of times, then gives up with one sentence.

``rdb_storage`` is how every inat process opens a database storage: SQLite with a long busy
timeout (several workers write one file; SQLite's default of 5 s is shorter than a commit
can wait behind N workers' heartbeats and tells), and, for the sweeper, the heartbeat
interval, grace period and retry callback of ``inat.sweep.heartbeat``.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from typing import Any, Dict, Optional

from inat.errors import InatError

# The losing process's second attempt finds the winner's schema; the rest cover a storage
# that is slow to commit (SQLite's busy timeout, a remote server) before giving up.
CREATE_ATTEMPTS = 5
RETRY_PAUSE_S = 0.2  # first pause; doubled each time (0.2 + 0.4 + 0.8 + 1.6 s at most)
SQLITE_TIMEOUT_S = 60.0  # how long a SQLite writer waits for another worker's lock before "database is locked"


def hide_password(url: Optional[str]) -> Optional[str]:
    """A storage URL safe to write into a folder: ``user:***@host`` instead of the password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url) if url else url


def engine_kwargs(url: str) -> Dict[str, Any]:
    """SQLAlchemy engine options for a storage URL: SQLite's busy timeout, nothing for a server."""
    return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if str(url).startswith("sqlite") else {}


def database_url(url: Optional[str]) -> bool:
    """True for a SQLAlchemy storage URL (SQLite, PostgreSQL, MySQL); False for none (in memory) or Redis."""
    return bool(url) and not str(url).startswith("redis")


def rdb_storage(url: Optional[str], heartbeat_seconds: Optional[float] = None, retries: int = 0) -> Any:
    """The storage for ``url``: an ``RDBStorage`` for a database URL, ``url`` itself otherwise (None, Redis).

    With ``heartbeat_seconds`` the storage fails a RUNNING trial silent for 2x that long (Optuna
    wants whole seconds: rounded up, at least 1) and retries it ``retries`` times with the same
    parameters (``RetryFailedTrialCallback``; none with 0).
    """
    if not database_url(url):
        return url
    import optuna

    options: Dict[str, Any] = {}
    if heartbeat_seconds is not None and heartbeat_seconds > 0:
        options["heartbeat_interval"] = max(1, math.ceil(heartbeat_seconds))
        options["grace_period"] = max(1, math.ceil(2 * heartbeat_seconds))
        if retries > 0:
            with warnings.catch_warnings():  # experimental since Optuna 2.8; the API we use is the 2.10 one
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                options["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=int(retries))
    return optuna.storages.RDBStorage(str(url), engine_kwargs=engine_kwargs(url), **options)


def open_study(study_name: Optional[str], storage: Optional[str], *, heartbeat_seconds: Optional[float] = None,
               retries: int = 0, **kwargs: Any) -> Any:
    """``optuna.create_study(study_name, storage, load_if_exists=True, **kwargs)``, safe against a racing creator.

    ``storage`` is a URL, opened through ``rdb_storage`` (with the heartbeat settings given).
    Retries on the SQLAlchemy errors a concurrent first creation raises; a storage that
    still fails after ``CREATE_ATTEMPTS`` attempts is InatError naming it (password hidden).
    """
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(CREATE_ATTEMPTS):
        try:  # the storage too: on a fresh SQLite file its CREATE TABLE is what races
            return optuna.create_study(study_name=study_name, storage=rdb_storage(storage, heartbeat_seconds, retries),
                                       load_if_exists=True, **kwargs)
        except (IntegrityError, OperationalError) as err:
            last = str(err.orig if getattr(err, "orig", None) is not None else err).splitlines()[0]
            if attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(RETRY_PAUSE_S * 2 ** attempt)
    raise InatError(f"Could not create or load study '{study_name}' in {hide_password(storage)} after "
                    f"{CREATE_ATTEMPTS} attempts ({last}); check that the storage is reachable and writable.")
