"""Many workers, one study: three concurrent sweep processes share a PostgreSQL-backed study.

Needs a server: ``make test`` starts one on loopback and exports ``INAT_PG_URL``
(tools/test_services.sh); without it the test fails, it is never skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from test_sweep import ROOT, SMALL, make_dataset  # tests/ is on sys.path under pytest

WORKERS, TRIALS_EACH = 3, 2


@pytest.fixture
def pg_url() -> str:
    url = os.environ.get("INAT_PG_URL")
    if not url:
        # Never a skip: `make test` starts the server (tools/test_services.sh), so a missing one is a failure.
        pytest.fail("INAT_PG_URL is not set: run the suite with `make test`, which starts PostgreSQL on loopback, "
                    "or start it with `eval \"$(experiments/sweep/start_postgres.sh)\"`.")
    return url


def test_three_workers_share_one_study(pg_url, tmp_path):
    import optuna

    data = make_dataset(tmp_path / "data")
    sweep_dir = tmp_path / "shared_sweep"  # one folder for all workers, as on a shared file system
    study_name = f"inat_test_{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "INAT_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage={pg_url}",
               f"hydra.sweeper.study_name={study_name}", f"hydra.sweeper.n_trials={TRIALS_EACH}",
               f"hydra.sweep.dir={sweep_dir}", f"data.root={data}", "train.epochs=1", "sweep.prune=false", *SMALL]
    # Create Optuna's tables once: on an empty database, concurrent first connections race on
    # CREATE TABLE (a one-off set-up step, not what this test is about). The study itself is
    # still created by the racing workers (load_if_exists).
    optuna.storages.RDBStorage(pg_url)
    workers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(WORKERS)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name=study_name, storage=pg_url)
    try:
        trials = study.get_trials(deepcopy=False)
        expected = WORKERS * TRIALS_EACH
        assert len(trials) == expected, [(t.number, t.state.name, t.params, t.system_attrs, t.user_attrs) for t in trials]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
        numbers = sorted(t.number for t in trials)
        assert numbers == list(range(expected))  # none duplicated, none lost
        for t in trials:  # each trial's run folder is the one named by its number
            folder = Path(t.user_attrs["run_dir"])
            assert folder == sweep_dir / str(t.number) and (folder / "summary.json").is_file()
        assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == sorted(map(str, numbers))
        # Reseeded workers propose different start-up configurations.
        assert len({tuple(sorted(t.params.items())) for t in trials}) == expected
    finally:
        optuna.delete_study(study_name=study_name, storage=pg_url)
