"""Create-or-load an Optuna study safely when several processes start on one new storage at once.

``optuna.create_study(load_if_exists=True)`` is not atomic on a fresh SQLite file: each
process finds no tables, both issue ``CREATE TABLE`` (or both insert the schema version),
and the loser gets a raw SQLAlchemy ``OperationalError`` ("table studies already exists")
or ``IntegrityError`` (a UNIQUE constraint). Once the winner has committed, the schema and
the study exist, so the loser only has to load again: ``open_study`` retries a bounded
number of times, then gives up with one sentence.
"""
from __future__ import annotations

import re
import time
from typing import Any, Optional

from inat.errors import InatError

# The losing process's second attempt finds the winner's schema; the rest cover a storage
# that is slow to commit (SQLite's busy timeout, a remote server) before giving up.
CREATE_ATTEMPTS = 5
RETRY_PAUSE_S = 0.2  # first pause; doubled each time (0.2 + 0.4 + 0.8 + 1.6 s at most)


def hide_password(url: Optional[str]) -> Optional[str]:
    """A storage URL safe to write into a folder: ``user:***@host`` instead of the password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url) if url else url


def open_study(study_name: Optional[str], storage: Optional[str], **kwargs: Any) -> Any:
    """``optuna.create_study(study_name, storage, load_if_exists=True, **kwargs)``, safe against a racing creator.

    Retries on the SQLAlchemy errors a concurrent first creation raises; a storage that
    still fails after ``CREATE_ATTEMPTS`` attempts is InatError naming it (password hidden).
    """
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, **kwargs)
        except (IntegrityError, OperationalError) as err:
            last = str(err.orig if getattr(err, "orig", None) is not None else err).splitlines()[0]
            if attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(RETRY_PAUSE_S * 2 ** attempt)
    raise InatError(f"Could not create or load study '{study_name}' in {hide_password(storage)} after "
                    f"{CREATE_ATTEMPTS} attempts ({last}); check that the storage is reachable and writable.")
