"""A newcomer's first hour: what ``make test`` sets up on the system, and the first run's console.

``tools/test_services.sh`` is what ``make test`` runs around pytest; its refusals are tested
here with a PATH that hides the system (a fake ``id`` makes it a non-root user), so they hold
on this machine, where it runs as root with everything installed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, make_dataset, run_cli

SCRIPT = REPO / "tools" / "test_services.sh"
BASH = "/bin/bash"


def shim(tmp_path: Path, uid: int, commands: dict) -> Path:
    """A folder for PATH holding only ``dirname``, an ``id`` that prints ``uid``, and ``commands`` (name -> script)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "dirname").symlink_to("/usr/bin/dirname")
    for name, body in {"id": f'echo {uid}', **commands}.items():
        path = folder / name
        path.write_text(f"#!{BASH}\n{body}\n")
        path.chmod(0o755)
    return folder


def services(tmp_path: Path, path: Path, *command: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("INAT_PG_URL", "INAT_CHROMIUM")}
    return subprocess.run([BASH, str(SCRIPT), *command], env={**clean, "PATH": str(path), **env},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_without_root_it_names_what_to_install_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    done = services(tmp_path, shim(tmp_path, 1000, {}), "/usr/bin/touch", str(marker))
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "chromium postgresql" in lines[0] and "apt-get install" in lines[0]
    assert not marker.exists(), "the tests ran although the system lacks what they need"


def test_without_root_and_no_database_url_it_says_how_to_give_one(tmp_path):
    path = shim(tmp_path, 1000, {"chromium": "exit 0", "pg_ctlcluster": "exit 0"})
    marker = tmp_path / "ran"
    done = services(tmp_path, path, "/usr/bin/touch", str(marker))
    assert done.returncode == 2, done
    assert re.fullmatch(r"error: .*run make test as root, or set INAT_PG_URL=\S+ .*\.\n", done.stderr), done.stderr
    assert not marker.exists()


def test_given_chromium_and_database_it_runs_the_command_with_the_url(tmp_path):
    url = "postgresql://me:secret@127.0.0.1:6543/mine"
    done = services(tmp_path, shim(tmp_path, 1000, {}), "/usr/bin/env",
                    INAT_CHROMIUM="/usr/bin/true", INAT_PG_URL=url)
    assert done.returncode == 0, done
    assert f"INAT_PG_URL={url}\n" in done.stdout
    assert done.stderr == ""


def test_the_command_exit_status_is_kept(tmp_path):
    done = services(tmp_path, shim(tmp_path, 1000, {}), "/usr/bin/false",
                    INAT_CHROMIUM="/usr/bin/true", INAT_PG_URL="postgresql://a:b@127.0.0.1:1/c")
    assert done.returncode == 1


def test_ci_runs_the_readme_command_and_nothing_the_tests_need_beyond_it():
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert not any(word in ci for word in ("apt-get", "postgres", "chromium", "pip ")), ci


def test_make_test_goes_through_the_service_script():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "tools/test_services.sh" in recipe and "pytest" in recipe


def test_offline_wandb_prints_one_line_and_the_run_ends_with_the_result(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_QUIET"):  # wandb's own settings, as a new user has them
        monkeypatch.delenv(name, raising=False)
    data = make_dataset(tmp_path / "data", n_classes=2, n_train=6, n_test=2, size=24)
    args = [a for a in FAST if not a.startswith("wandb.")]
    done = run_cli([*args, "wandb.mode=offline", "train.epochs=1", f"data.root={data}",
                    f"hydra.run.dir={tmp_path / 'run'}"], env={"INAT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    about_wandb = [line for line in lines if line.lower().startswith("wandb")]
    assert len(about_wandb) == 1, about_wandb
    folder = Path(re.search(r"wandb offline: (\S+)", about_wandb[0]).group(1))
    assert folder.is_dir() and folder.name.startswith("offline-run-") and any(folder.glob("*.wandb"))
    stdout = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    # The result is the last thing printed: accuracy, macro-F1, the rejection line, then one line per class.
    assert stdout[-5].startswith("test accuracy") and stdout[-4].startswith("macro-F1"), stdout[-7:]
    assert "rejection threshold" in stdout[-3], stdout[-7:]
    assert [line.split()[0] for line in stdout[-2:]] == ["class_0", "class_1"], stdout


@pytest.mark.parametrize("ci, outcome", [("true", "1 failed, 1 passed"), ("", "1 passed, 1 skipped")])
def test_under_ci_a_skipped_test_counts_as_failed(tmp_path, ci, outcome):
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\ndef test_skips():\n    pytest.skip('no thing')\n\ndef test_passes():\n    pass\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert outcome in done.stdout, done.stdout
