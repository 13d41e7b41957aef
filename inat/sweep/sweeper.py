"""``InatOptunaSweeper``: hydra-optuna-sweeper's sweeper with what our sweeps need on top.

The plugin's ``sweep`` loop, rewritten around the same helpers, adds:

- trial folders named by the Optuna trial number (``hydra.job.num`` = trial number), so any
  number of workers sharing one study (PostgreSQL) can share one sweep folder without clashes;
- ``wandb.group`` = the sweep folder's name for every trial (unless the command sets it);
- per-epoch validation accuracy reported to Optuna, and trials the median rule stopped
  (``summary.json`` stop_reason "pruned: ...") told as PRUNED, so TPE and ``best_trial``
  only treat full-fidelity results as finished;
- ``sweep.budget_minutes``: once the study's finished trials add up to that much compute
  (worker-minutes, start to end of each trial, summed over all workers and all sessions of the
  study), the next trial is not trained: it gets a run folder whose summary says
  ``stop_reason: "budget: ..."`` (accuracy 0, the poor value), is told to Optuna as PRUNED,
  and the worker stops asking for trials. Running trials do not count (a crashed worker's
  trial only ends when its heartbeat goes stale), so each worker can overshoot by the trial it is on;
- a seeded sampler continuing a study that already has trials is reseeded from (seed, number
  of trials so far): otherwise the rerun would replay the first session's proposals (random
  search would train trials 0, 1, 2... again), and the continuation stays reproducible;
- ``sweep.max_trials``: no trial is asked once the study holds that many (every worker, every
  state; retry copies of failed trials do not count, and a queued retry is always trained).
  Counting and asking happen under a lock file in the sweep folder, so workers on one machine
  (``python -m inat.sweep.workers``) hold the budget exactly; workers on several machines
  sharing a server storage each count on their own and can overshoot by at most one trial each;
- heartbeats (database storages): the study's storage fails a RUNNING trial whose heartbeat
  (recorded by the trial's own process, ``inat.sweep.heartbeat``) is older than
  2 x ``sweep.heartbeat_seconds``, checked before each ask, and queues a copy with the same
  parameters up to ``sweep.retries`` times; a trial whose process the launcher lost is retried
  the same way, and a trial the storage already holds as finished is not told again.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf

from inat.cli import fail
from inat.errors import InatError
from inat.run_folder import BUDGET_PREFIX, HYDRA_OVERRIDES, OPTIMIZATION_RESULTS, SWEEP_INFO, Summary, write_summary
from inat.runs import atomic_open, exclusive_file, os_error_sentence, write_json
from inat.sweep.heartbeat import RETRIED, fail_stale, finished_in_storage, is_retry, retry
from inat.sweep.space import sweep_errors
from inat.sweep.study import hide_password, open_study
from inat.sweep.trials import read_trial

log = logging.getLogger(__name__)

ASK_LOCK = ".ask.lock"  # in the sweep folder while a worker counts the study's trials and asks one


def budget_count(trials: Sequence[Any]) -> int:
    """Trials that use up ``sweep.max_trials``: all but the retry copies of failed trials."""
    return sum(1 for t in trials if not is_retry(t))


def ask_within(study: Any, max_trials: int, lock_path: Optional[Path]) -> Optional[Any]:
    """Fail stale trials, then ask the next trial unless ``max_trials`` (> 0) are already in the study.

    A queued trial (a retry, an enqueued configuration) is always asked: it is counted already.
    Under ``lock_path`` (an flock, see ``inat.runs.exclusive_file``) no other worker on this
    machine counts or asks in between, so the budget holds exactly; a worker on another machine
    does not see the lock and may ask in between, one trial at most per worker and ask.
    """
    import optuna

    try:
        held = exclusive_file(lock_path, wait=True) if lock_path is not None else contextlib.nullcontext()
        with held:
            fail_stale(study)
            if max_trials > 0:
                trials = study.get_trials(deepcopy=False)
                queued = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
                if not queued and budget_count(trials) >= max_trials:
                    return None
            return study.ask()
    except OSError as err:
        raise InatError(os_error_sentence(err, Path(lock_path), "lock")) from err


def compute_minutes(study: Any) -> float:
    """Worker-minutes the study's finished trials took (start to end, every worker, every session)."""
    return sum((t.datetime_complete - t.datetime_start).total_seconds()
               for t in study.get_trials(deepcopy=False)
               if t.datetime_start is not None and t.datetime_complete is not None) / 60


def budget_spent(study: Any, budget_minutes: float) -> bool:
    """True when a positive compute budget is used up by the study's finished trials."""
    return budget_minutes > 0 and compute_minutes(study) >= budget_minutes


def continue_sampler(sampler: Any, seed: Optional[int], n_trials: int) -> bool:
    """Reseed a seeded sampler for a study that already holds ``n_trials`` trials.

    A fresh process seeds its sampler like the first session did, so it would replay that
    session's proposals. Optuna's only public hook, ``reseed_rng``, draws an unreproducible
    seed; seeding from ``(seed, n_trials)`` keeps the continuation exact. The samplers keep
    their generators in ``_rng`` (TPE also in its start-up ``_random_sampler``): used only
    where present, else ``reseed_rng``. Returns False when there was nothing to do.
    """
    if seed is None or n_trials == 0:
        return False
    inner = [s for s in (sampler, getattr(sampler, "_random_sampler", None)) if s is not None]
    if all(isinstance(getattr(s, "_rng", None), np.random.RandomState) for s in inner):
        for i, s in enumerate(inner):
            s._rng = np.random.RandomState([int(seed), int(n_trials), i])
    elif hasattr(sampler, "reseed_rng"):
        sampler.reseed_rng()
    return True


def write_sweep_info(sweep_dir: Path, impl: Any, study_name: str, arguments: List[str], budget: float) -> None:
    """``sweep.json``: what the report and the proxy promotion need (Optuna writes no multirun.yaml)."""
    params = OmegaConf.to_container(impl.params, resolve=True) if impl.params is not None else {}
    info = {"storage": hide_password(impl.storage), "study_name": study_name, "params": params,
            "arguments": arguments, "direction": impl._get_directions()[0], "budget_minutes": budget,
            "sampler": type(impl.sampler).__name__}
    # TPE's first n_startup_trials are drawn at random: the report's effects come from them alone.
    startup = OmegaConf.select(impl.config, "hydra.sweeper.sampler.n_startup_trials", default=None)
    if startup is not None:
        info["n_startup_trials"] = int(startup)
    write_json(sweep_dir / SWEEP_INFO, info)


def check_dataset(data_cfg: Any) -> None:
    """Fetch (nature_12K on first use) and list the training folder once, before the study exists.

    Without it a missing or unreachable dataset failed inside trial 0, after the study, its
    SQLite file and the first trial folder had been created; now it is one sentence and exit 2
    with nothing written. The trials still resolve the root themselves (cheap once it exists).
    """
    # here, not at the top: Hydra imports this module at every start-up (plugin discovery), and the data
    # layer brings urllib, ssl and tqdm (inat.data.download)
    from inat.data.dataset import dataset_root, scan_train_set

    try:
        scan_train_set(data_cfg, dataset_root(data_cfg))
    except InatError as err:
        fail(str(err))


def release_failures(returns: Sequence[Any]) -> None:
    """Drop the tracebacks (and so the frames) of failed trials' exceptions, keeping the exceptions."""
    for ret in returns:
        err, seen = getattr(ret, "_return_value", None), set()
        while isinstance(err, BaseException) and id(err) not in seen:
            seen.add(id(err))
            err.__traceback__ = None
            err = err.__cause__ or err.__context__


def free_device_memory() -> None:
    """Collect what finished trials left (reference cycles) and hand cached CUDA blocks back."""
    gc.collect()
    torch = sys.modules.get("torch")  # a sweep that never imported torch has nothing to free
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def fail_and_retry(study: Any, trials: Sequence[Any]) -> None:
    """Tell still-running ``trials`` FAIL and hand them to the retry callback; never raises."""
    import optuna

    for trial in trials:
        try:
            if not finished_in_storage(study, trial):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                retry(study, trial._trial_id)
        except Exception as err:  # noqa: BLE001 - the process is ending; a stale heartbeat still catches it
            log.warning(f"Trial {trial.number} could not be told FAIL ({type(err).__name__}: {err}).")


def tell_trial(study: Any, trial: Any, ret: Any, sweep_dir: Path, retry_failed: bool) -> Optional[Exception]:
    """Tell one trial from its JobReturn and folder (skipped when the storage holds it finished already).

    Returns the job's exception when it failed; ``retry_failed`` hands a FAIL trial to the retry callback.
    """
    import optuna

    if finished_in_storage(study, trial):
        log.warning(f"Trial {trial.number} is already finished in the study (failed as stale by another "
                    "worker?): its result is not told.")
        return None
    folder = sweep_dir / str(trial.number)
    info = read_trial(folder) if folder.is_dir() else None
    trial.set_user_attr("run_dir", str(folder))
    try:
        value = float(ret.return_value)  # raises the job's own exception when it failed
    except Exception as err:  # noqa: BLE001 - any job failure is a FAIL trial
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning(f"Trial {trial.number} failed: {err}")
        if retry_failed:
            retry(study, trial._trial_id)
        return err
    if info is not None:
        for row in info.curve:
            trial.report(row.val_accuracy, step=row.epoch)
        trial.set_user_attr("stop_reason", info.stop_reason)
    if info is not None and info.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, values=[value])
    return None


class InatOptunaSweeper(OptunaSweeper):
    """The Optuna sweeper of ``conf/hydra/sweeper/optuna.yaml`` (same constructor as the plugin's)."""

    def sweep(self, arguments: List[str]) -> None:
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        impl = self.sweeper
        assert impl.config is not None and impl.launcher is not None
        cfg = impl.config
        sweep_dir = Path(cfg.hydra.sweep.dir)

        errors = sweep_errors(impl.n_trials, OmegaConf.to_container(impl.params) if impl.params else {}, arguments)
        if errors:  # Optuna would answer an inverted interval with a raw traceback
            fail(errors[0])
        impl._process_searchspace_config()
        params_conf = impl._parse_sweeper_params_config() + list(arguments)
        if not any(a.lstrip("+~").split("=", 1)[0] == "wandb.group" for a in params_conf):
            params_conf.append(f"wandb.group={sweep_dir.name}")
        distributions, fixed = create_params_from_overrides(params_conf)
        if impl.search_space_distributions:
            distributions = {**impl.search_space_distributions, **distributions}
        for name in fixed:  # a pinned key leaves the search space
            distributions.pop(name, None)
        directions = impl._get_directions()
        if len(directions) != 1:
            raise ValueError("InatOptunaSweeper optimises one objective (validation accuracy); "
                             f"got directions {directions}.")

        if not {"data.root", "data.manifest"} & set(distributions):  # each trial checks a swept root or manifest
            check_dataset(cfg.data)
        # SQLite cannot create the folder its file lives in, and Hydra makes it only at launch.
        sweep_dir.mkdir(parents=True, exist_ok=True)
        heartbeat = float(OmegaConf.select(cfg, "sweep.heartbeat_seconds", default=0.0) or 0.0)
        retries = int(OmegaConf.select(cfg, "sweep.retries", default=0) or 0)
        try:  # two sweeps starting on one new SQLite file race to create it
            study = open_study(impl.study_name, impl.storage, heartbeat_seconds=heartbeat, retries=retries,
                               sampler=impl.sampler, directions=directions)
        except InatError as err:
            fail(str(err))
        log.info(f"Study {study.study_name} in {hide_password(impl.storage)} ({type(impl.sampler).__name__}, "
                 f"{directions[0]}); trial folders in {sweep_dir}")
        if impl.storage and not str(impl.storage).startswith("sqlite") and hasattr(impl.sampler, "reseed_rng"):
            # Workers sharing a server study would all replay the same seeded random start-up
            # trials; a per-process seed keeps their proposals apart (one SQLite worker stays exact).
            impl.sampler.reseed_rng()
            log.info("Shared storage: sampler reseeded for this worker.")
        elif continue_sampler(impl.sampler, OmegaConf.select(cfg, "hydra.sweeper.sampler.seed", default=None),
                              n_done := len(study.get_trials(deepcopy=False))):
            log.info(f"Continuing a study of {n_done} trials "
                     f"({compute_minutes(study):.1f} compute-minutes so far): sampler reseeded from (seed, trials).")
        budget = float(OmegaConf.select(cfg, "sweep.budget_minutes", default=0.0) or 0.0)
        write_sweep_info(sweep_dir, impl, study.study_name, list(arguments), budget)

        max_trials = int(OmegaConf.select(cfg, "sweep.max_trials", default=0) or 0)
        lock = sweep_dir / ASK_LOCK
        to_go = int(impl.n_trials)  # this process's own new trials; retries of failed trials come on top
        while to_go > 0:
            if budget_spent(study, budget):
                trial = ask_within(study, max_trials, lock)
                if trial is not None:
                    self._mark_budget(study, trial, distributions, fixed, sweep_dir, budget)
                    log.info(f"Sweep budget of {budget:g} minutes spent: trial {trial.number} not trained; stopping.")
                break
            batch = []
            for _ in range(min(to_go, max(1, int(impl.n_jobs)))):
                trial = ask_within(study, max_trials, lock)
                if trial is None:
                    break
                batch.append(trial)
            if not batch:
                log.info(f"The study holds sweep.max_trials={max_trials} trials: this worker stops asking.")
                break
            for trial in batch:
                trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
                if is_retry(trial):
                    log.info(f"Trial {trial.number} retries trial {trial.system_attrs[RETRIED]} "
                             "with the same parameters.")
            overrides = impl._configure_trials(batch, distributions, fixed)
            numbers = [t.number for t in batch]
            if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                groups = [(batch, overrides)]
            else:  # another worker took numbers in between: launch one by one to keep folder = number
                groups = [([t], [o]) for t, o in zip(batch, overrides)]
            for trials, ovs in groups:
                self._launch_and_tell(study, trials, ovs, sweep_dir)
            to_go -= budget_count(batch)

        self._save_results(study, sweep_dir)

    def _launch_and_tell(self, study: Any, trials: Sequence[Any], overrides: Sequence[Any], sweep_dir: Path) -> None:
        """Run one batch of trials in this process and tell Optuna; nothing of theirs outlives the call.

        A failed trial's JobReturn holds its exception, whose traceback holds the training
        frames and so the model, optimizer and GPU-resident cache: kept until the next launch
        returned, one CUDA OOM made the trials after it run out of memory too.
        """
        lost = False
        try:
            returns = self.sweeper.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except Exception as err:  # noqa: BLE001 - a trial's process died (submitit UncompletedJobError,
            # joblib TerminatedWorkerError): the launcher has no result for the batch, so its trials are
            # told FAIL below (and retried) instead of the sweep aborting with them left RUNNING in the study.
            log.warning(f"Trials {[t.number for t in trials]}: the launcher lost their jobs ({type(err).__name__}).")
            returns = [JobReturn(status=JobStatus.FAILED, _return_value=err) for _ in trials]
            lost = True
        except BaseException as err:  # the trial ended this very process (Ctrl-C, a stop signal's exit):
            # tell its trials FAIL and queue their retries now, rather than when their heartbeat goes stale.
            log.warning(f"Trials {[t.number for t in trials]} stopped with this process ({type(err).__name__}).")
            fail_and_retry(study, trials)
            raise
        try:
            self._tell(study, trials, returns, sweep_dir, retry_failed=lost)
        finally:
            release_failures(returns)
            del returns
            free_device_memory()

    def _tell(self, study: Any, trials: Sequence[Any], returns: Sequence[Any], sweep_dir: Path,
              retry_failed: bool = False) -> None:
        """Report each trial's curve, then tell COMPLETE / PRUNED / FAIL like the plugin does.

        A trial the storage already holds as finished is logged and skipped: another worker failed
        it as stale (no heartbeat while its job waited to be requeued, or this process was paused)
        and its retry is someone else's. ``retry_failed``: hand FAIL trials to the retry callback
        (the launcher lost their processes, which is what a stale heartbeat would have said).
        """
        failures = []
        for trial, ret in zip(trials, returns):
            try:
                failure = tell_trial(study, trial, ret, sweep_dir, retry_failed)
            except RuntimeError:  # Optuna's "already finished": another worker failed it just now
                if not finished_in_storage(study, trial):
                    raise
                log.warning(f"Trial {trial.number} was finished by another worker while it was told; skipped.")
                continue
            if failure is not None:
                failures.append(failure)
        if failures and len(failures) / len(returns) > self.sweeper.max_failure_rate:
            for ret in returns:
                ret.return_value  # re-raise the first failure with its traceback, as the plugin does

    def _mark_budget(self, study: Any, trial: Any, distributions: Dict[str, Any], fixed: Dict[str, Any],
                     sweep_dir: Path, budget: float) -> None:
        """A trial asked after the budget: a run folder saying so, accuracy 0, PRUNED in Optuna."""
        import optuna

        (overrides,) = self.sweeper._configure_trials([trial], distributions, fixed)
        folder = sweep_dir / str(trial.number)
        (folder / ".hydra").mkdir(parents=True, exist_ok=True)
        (folder / HYDRA_OVERRIDES).write_text("".join(f"- {o}\n" for o in overrides))
        reason = f"{BUDGET_PREFIX} sweep budget of {budget:g} minutes spent before this trial started"
        # The same Summary type fit writes: readers tell it apart by stop_reason, not by missing keys.
        write_summary(folder, Summary(best_val_accuracy=0.0, val_accuracy=0.0, stop_reason=reason))
        trial.set_user_attr("stop_reason", reason)
        trial.set_user_attr("run_dir", str(folder))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    @staticmethod
    def _save_results(study: Any, sweep_dir: Path) -> None:
        """``optimization_results.yaml`` as the plugin writes it, when a trial completed."""
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            log.info("No completed trial yet.")
            return
        best = study.best_trial
        log.info(f"Best value {best.value} (trial {best.number}): {best.params}")
        results = OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value,
                                    "best_trial": best.number})
        with atomic_open(sweep_dir / OPTIMIZATION_RESULTS) as fh:  # every worker writes it as it ends
            fh.write(OmegaConf.to_yaml(results))
