"""inat's Optuna sweeper under Hydra's parallel launchers: joblib, submitit_local, submitit_slurm.

One module-scoped sweep folder is grown by real ``python run.py -m hydra/sweeper=optuna`` commands
on a tiny generated dataset: two trials at once in joblib's worker processes, then one more trial
through submitit_local continuing the same study (trial 2, so the folder must follow the trial
number, not the launcher's own count). The SLURM preset runs against stand-in ``sbatch``/``srun``
commands written into the test's folder (real SLURM is not available here): that checks the sbatch
script submitit writes from ``conf/hydra/launcher/slurm.yaml`` and the array-job path through
inat's sweeper, not SLURM's scheduling, signals or requeue.
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import FAST, make_dataset, run_cli

pytestmark = pytest.mark.slow  # each command starts several Python processes


def run_sweep(args: list, env: dict, check: bool = True):
    proc = run_cli(["-m", "hydra/sweeper=optuna", *args], env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load_study(sweep_dir: Path):
    import optuna

    return optuna.load_study(study_name="inat_part_a", storage=f"sqlite:///{sweep_dir}/optuna.db")


def trial_span(folder: Path) -> tuple:
    """(start, end) of a trial: Hydra writes .hydra/config.yaml before the task, fit writes summary.json last."""
    return (folder / ".hydra" / "config.yaml").stat().st_mtime, (folder / "summary.json").stat().st_mtime


def check_trial_folders(sweep_dir: Path, numbers: range) -> None:
    """Every trial is COMPLETE, in the folder named by its number, with the parameters Optuna gave it."""
    study = load_study(sweep_dir)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == list(numbers)
    for n in numbers:
        folder = sweep_dir / str(n)
        summary = json.loads((folder / "summary.json").read_text())
        assert trials[n].state.name == "COMPLETE", (n, trials[n].state)
        assert trials[n].value == pytest.approx(summary["best_val_accuracy"])
        assert trials[n].user_attrs["run_dir"] == str(folder)
        # the folder holds the run of this trial's parameters, not a neighbour's
        assert summary["config"]["train"]["lr"] == pytest.approx(trials[n].params["train.lr"])
        assert summary["config"]["act"]["name"] == trials[n].params["act"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("launchers")
    data = make_dataset(root / "data", n_classes=2, n_train=8, n_test=2, size=32)
    # Module scope runs before the per-test cache fixture: the cache and wandb settings go in by hand.
    env = {"INAT_CACHE": str(root / "cache"), "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    common = [f"data.root={data}", "train.epochs=1", *FAST]
    return SimpleNamespace(root=root, data=data, env=env, common=common)


@pytest.fixture(scope="module")
def shared_sweep(base) -> SimpleNamespace:
    """Trials 0 and 1 through joblib (two at once), then trial 2 through submitit_local."""
    sweep_dir = base.root / "sweep"
    common = [f"hydra.sweep.dir={sweep_dir}", *base.common]
    joblib = run_sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                        "hydra.sweeper.n_trials=2", *common], base.env)
    local = run_sweep(["hydra/launcher=submitit_local", "hydra.sweeper.n_trials=1", *common], base.env)
    return SimpleNamespace(dir=sweep_dir, logs=(joblib, local))


def test_joblib_runs_two_trials_at_once(shared_sweep):
    check_trial_folders(shared_sweep.dir, range(0, 3))
    (start0, end0), (start1, end1) = trial_span(shared_sweep.dir / "0"), trial_span(shared_sweep.dir / "1")
    assert max(start0, start1) < min(end0, end1), "the two joblib trials did not run at the same time"
    assert "is launching 2 jobs" in shared_sweep.logs[0].stdout + shared_sweep.logs[0].stderr


def test_submitit_local_trial_is_named_by_its_trial_number(shared_sweep):
    folder = shared_sweep.dir / "2"  # the launcher was asked with initial_job_idx=2
    assert (folder / "summary.json").is_file() and (folder / ".hydra" / "overrides.yaml").is_file()
    results = list((shared_sweep.dir / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 1, "trial 2 did not run as a submitit job"
    assert json.loads((shared_sweep.dir / "sweep.json").read_text())["study_name"] == "inat_part_a"


FAKE_SBATCH = r'''#!{python}
"""Stand-in sbatch: run the script (each array task) in the background with SLURM's variables."""
import os, re, subprocess, sys
from pathlib import Path
script = Path(sys.argv[-1])
counter = Path(__file__).with_name("next_job_id")
job_id = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(job_id + 1))
with open(Path(__file__).with_name("sbatch_scripts.txt"), "a") as log:
    log.write(script.read_text() + "\n#----\n")
m = re.search(r"^#SBATCH --array=(\d+)-(\d+)", script.read_text(), re.M)
tasks = range(int(m[1]), int(m[2]) + 1) if m else [None]
for i, a in enumerate(tasks):
    env = {{**os.environ, "SLURM_JOB_ID": str(job_id * 100 + i), "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}}
    if a is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(a))
    subprocess.Popen(["bash", str(script)], env=env, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job_id}}")
'''

FAKE_SRUN = r'''#!{python}
"""Stand-in srun: one task, --output/--error patterns expanded as SLURM does, then exec the command."""
import os, sys
args, files = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = args.pop(0)
def expand(p):
    e = os.environ
    return (p.replace("%A", e.get("SLURM_ARRAY_JOB_ID", "")).replace("%a", e.get("SLURM_ARRAY_TASK_ID", ""))
             .replace("%j", e["SLURM_JOB_ID"]).replace("%t", "0"))
for flag, fd in (("--output", 1), ("--error", 2)):
    if flag in files:
        path = expand(files[flag])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
os.execvp(args[0], args)
'''


def fake_slurm(bin_dir: Path) -> Path:
    """``sbatch``, ``srun`` and no-op ``sacct``/``scancel``/``scontrol`` in ``bin_dir`` (first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {"sbatch": FAKE_SBATCH.format(python=sys.executable), "srun": FAKE_SRUN.format(python=sys.executable),
               "sacct": "#!/bin/sh\n", "scancel": "#!/bin/sh\n", "scontrol": "#!/bin/sh\n"}
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def test_slurm_preset_runs_a_batch_as_one_array_job(base):
    """hydra/launcher=slurm: two trials submitted as one sbatch array, told to Optuna from their folders."""
    bin_dir = fake_slurm(base.root / "fake_slurm")
    sweep_dir = base.root / "slurm_sweep"
    env = {**base.env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run_sweep(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweeper.n_jobs=2",
               "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}", *base.common], env)
    check_trial_folders(sweep_dir, range(0, 2))
    (script,) = [s for s in (bin_dir / "sbatch_scripts.txt").read_text().split("#----\n") if s.strip()]
    header = set(re.findall(r"^#SBATCH (\S+)$", script, re.M))
    # what conf/hydra/launcher/slurm.yaml asks SLURM for (docs/sweep.md explains each line);
    # the array runs min(trials, array_parallelism) tasks at once
    for line in ("--array=0-1%2", "--signal=USR2@120", "--requeue", "--time=240", "--gpus-per-node=1",
                 "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=32GB", "--partition=gpu", "--open-mode=append"):
        assert line in header, (line, sorted(header))
    assert re.search(r"^srun --unbuffered .* -m submitit\.core\._submit ", script, re.M)


def test_a_trial_whose_job_died_is_told_failed_and_queued_again(base):
    from fit_hooks import hook_env

    sweep_dir = base.root / "killed"
    env = {**base.env, **hook_env(kill_after_epoch=1)}  # the trial SIGKILLs itself after its first epoch
    # joblib fails at once; submitit_local fails the same way after its 15 s wait for a result file
    run_sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=1",  # n_jobs=1 runs in-process
               f"hydra.sweep.dir={sweep_dir}", *base.common], env, check=False)
    trials = load_study(sweep_dir).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # lost, and its copy queued for the next ask
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0
