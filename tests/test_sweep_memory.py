"""A failed sweep trial must not keep its training frames alive into the next trial (GPU review E18).

Trials run in the sweep's own process; a failed trial's JobReturn holds its exception, whose
traceback holds the training frames (model, optimizer, GPU-resident cache) in a reference
cycle through the sweeper's own frame, so one CUDA OOM used to make the following trials OOM.
"""
from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch


class OomLauncher:
    """Runs each 'trial' in-process, as Hydra's basic launcher does, and fails it like a CUDA OOM."""

    def __init__(self) -> None:
        self.held = []  # weak references to what each trial's frame allocated
        self.alive_at_launch = []  # were the earlier trials' allocations still alive when the next launched?

    def _trial(self) -> None:
        cache = torch.zeros(1024, 1024)  # stands in for the GPU-resident image cache
        self.held.append(weakref.ref(cache))
        raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

    def launch(self, overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.alive_at_launch.append([ref() is not None for ref in self.held])
        try:
            self._trial()
        except RuntimeError as err:
            failed = JobReturn(status=JobStatus.FAILED, _return_value=err)
        return [failed for _ in overrides]


def sweeper(launcher: OomLauncher):
    from inat.sweep.sweeper import InatOptunaSweeper

    fake = types.SimpleNamespace(sweeper=types.SimpleNamespace(launcher=launcher, max_failure_rate=1.0))
    fake._tell = types.MethodType(InatOptunaSweeper._tell, fake)
    fake._launch_and_tell = types.MethodType(InatOptunaSweeper._launch_and_tell, fake)
    return fake


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()  # only the sweeper's own collection may free the cycle
    yield
    gc.enable()


def test_a_failed_trial_is_freed_before_the_next_one_starts(tmp_path, no_gc):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    launcher = OomLauncher()
    sweep = sweeper(launcher)
    for _ in range(3):
        sweep._launch_and_tell(study, [study.ask()], ["x=1"], tmp_path)
    assert launcher.alive_at_launch == [[], [False], [False, False]]
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert all(ref() is None for ref in launcher.held)


def test_without_the_release_the_cycle_keeps_the_trial_alive(tmp_path, no_gc, monkeypatch):
    """The failure mode itself, so the test above cannot pass for an unrelated reason."""
    import optuna

    import inat.sweep.sweeper as module

    monkeypatch.setattr(module, "release_failures", lambda returns: None)
    monkeypatch.setattr(module, "free_device_memory", lambda: None)
    study = optuna.create_study(direction="maximize")
    launcher = OomLauncher()
    sweep = sweeper(launcher)
    for _ in range(2):
        sweep._launch_and_tell(study, [study.ask()], ["x=1"], tmp_path)
    assert launcher.alive_at_launch == [[], [True]]
