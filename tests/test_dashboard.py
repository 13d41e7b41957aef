"""optuna-dashboard 0.13.0, the documented command (docs/sweep.md), against a sweep-like SQLite study.

The test writes a study the way inat's sweeper leaves one (name ``inat_part_a``, maximize, a
COMPLETE trial with its per-epoch val accuracy, a PRUNED one), starts ``optuna-dashboard`` on a
free loopback port, reads its study list and the study's trials through its JSON API
(``/api/studies``, ``/api/studies/<id>`` in ``optuna_dashboard/_app.py``), then stops it.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def make_study(path: Path) -> str:
    import optuna

    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name="inat_part_a", storage=url, direction="maximize")
    done = study.ask({"train.lr": optuna.distributions.LogUniformDistribution(3e-4, 1e-2)})
    for epoch, acc in enumerate((0.4, 0.55, 0.6), start=1):
        done.report(acc, step=epoch)
    study.tell(done, 0.6)
    pruned = study.ask({"train.lr": optuna.distributions.LogUniformDistribution(3e-4, 1e-2)})
    pruned.report(0.2, step=1)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout_s: float = 60) -> dict:
    """GET ``url`` until the server answers (it takes a few seconds to import and bind)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.slow  # a server process
def test_dashboard_lists_the_sweep_study(tmp_path):
    import optuna_dashboard

    assert optuna_dashboard.__version__ == "0.13.0"  # 0.14+ needs Optuna 3 and would migrate the database
    url = make_study(tmp_path / "optuna.db")
    port = free_port()
    command = Path(sys.executable).with_name("optuna-dashboard")  # the console script next to this Python
    server = subprocess.Popen([str(command), url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        except OSError:
            server.kill()
            raise AssertionError(f"optuna-dashboard did not answer:\n{server.communicate()[0][-3000:]}")
        assert [(s["study_name"], s["directions"]) for s in studies] == [("inat_part_a", ["maximize"])]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Pruned"]
        assert [v["value"] for v in detail["trials"][0]["intermediate_values"]] == [0.4, 0.55, 0.6]
        # the page docs/sweep.md says to open
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
