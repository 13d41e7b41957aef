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
  trial stays RUNNING forever), so each worker can overshoot by the trial it is on;
- a seeded sampler continuing a study that already has trials is reseeded from (seed, number
  of trials so far): otherwise the rerun would replay the first session's proposals (random
  search would train trials 0, 1, 2... again), and the continuation stays reproducible.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf

from inat.run_folder import BUDGET_PREFIX, SWEEP_INFO, Summary, write_summary
from inat.runs import write_json
from inat.sweep.study import hide_password, open_study
from inat.sweep.trials import read_trial

log = logging.getLogger(__name__)


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
    write_json(sweep_dir / SWEEP_INFO, {"storage": hide_password(impl.storage), "study_name": study_name,
                                          "params": params, "arguments": arguments,
                                          "direction": impl._get_directions()[0], "budget_minutes": budget,
                                          "sampler": type(impl.sampler).__name__})


def check_dataset(data_cfg: Any) -> None:
    """Fetch (nature_12K on first use) and list the training folder once, before the study exists.

    Without it a missing or unreachable dataset failed inside trial 0, after the study, its
    SQLite file and the first trial folder had been created; now it is one sentence and exit 2
    with nothing written. The trials still resolve the root themselves (cheap once it exists).
    """
    from inat.cli import fail
    from inat.data.download import ensure_dataset
    from inat.data.folder import scan_train
    from inat.errors import InatError

    try:
        scan_train(ensure_dataset(data_cfg))
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
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # a sweep that never imported torch has nothing to free
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class InatOptunaSweeper(OptunaSweeper):
    """The Optuna sweeper of ``conf/hydra/sweeper/optuna.yaml`` (same constructor as the plugin's)."""

    def sweep(self, arguments: List[str]) -> None:
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        from inat.cli import fail
        from inat.errors import InatError

        impl = self.sweeper
        assert impl.config is not None and impl.launcher is not None
        cfg = impl.config
        sweep_dir = Path(cfg.hydra.sweep.dir)

        from inat.sweep.space import sweep_errors

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

        if "data.root" not in distributions:  # a swept root is checked by each trial
            check_dataset(cfg.data)
        # SQLite cannot create the folder its file lives in, and Hydra makes it only at launch.
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:  # two sweeps starting on one new SQLite file race to create it
            study = open_study(impl.study_name, impl.storage, sampler=impl.sampler, directions=directions)
        except InatError as err:
            fail(str(err))
        log.info(f"Study {study.study_name} in {impl.storage} ({type(impl.sampler).__name__}, {directions[0]}); "
                 f"trial folders in {sweep_dir}")
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

        to_go = int(impl.n_trials)
        while to_go > 0:
            if budget_spent(study, budget):
                trial = study.ask()
                self._mark_budget(study, trial, distributions, fixed, sweep_dir, budget)
                log.info(f"Sweep budget of {budget:g} minutes spent: trial {trial.number} not trained; stopping.")
                break
            batch = [study.ask() for _ in range(min(to_go, max(1, int(impl.n_jobs))))]
            overrides = impl._configure_trials(batch, distributions, fixed)
            numbers = [t.number for t in batch]
            if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                groups = [(batch, overrides)]
            else:  # another worker took numbers in between: launch one by one to keep folder = number
                groups = [([t], [o]) for t, o in zip(batch, overrides)]
            for trials, ovs in groups:
                self._launch_and_tell(study, trials, ovs, sweep_dir)
            to_go -= len(batch)

        self._save_results(study, sweep_dir)

    def _launch_and_tell(self, study: Any, trials: Sequence[Any], overrides: Sequence[Any], sweep_dir: Path) -> None:
        """Run one batch of trials in this process and tell Optuna; nothing of theirs outlives the call.

        A failed trial's JobReturn holds its exception, whose traceback holds the training
        frames and so the model, optimizer and GPU-resident cache: kept until the next launch
        returned, one CUDA OOM made the trials after it run out of memory too.
        """
        try:
            returns = self.sweeper.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except Exception as err:  # noqa: BLE001 - a trial's process died (submitit UncompletedJobError,
            # joblib TerminatedWorkerError): the launcher has no result for the batch, so its trials are
            # told FAIL below instead of the sweep aborting with them left RUNNING in the study.
            from hydra.core.utils import JobReturn, JobStatus

            log.warning(f"Trials {[t.number for t in trials]}: the launcher lost their jobs ({type(err).__name__}).")
            returns = [JobReturn(status=JobStatus.FAILED, _return_value=err) for _ in trials]
        try:
            self._tell(study, trials, returns, sweep_dir)
        finally:
            release_failures(returns)
            del returns
            free_device_memory()

    def _tell(self, study: Any, trials: Sequence[Any], returns: Sequence[Any], sweep_dir: Path) -> None:
        """Report each trial's curve, then tell COMPLETE / PRUNED / FAIL like the plugin does."""
        import optuna

        failures = []
        for trial, ret in zip(trials, returns):
            folder = sweep_dir / str(trial.number)
            info = read_trial(folder) if folder.is_dir() else None
            trial.set_user_attr("run_dir", str(folder))
            try:
                value = float(ret.return_value)  # raises the job's own exception when it failed
            except Exception as err:  # noqa: BLE001 - any job failure is a FAIL trial
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning(f"Trial {trial.number} failed: {err}")
                failures.append(err)
                continue
            if info is not None:
                for row in info.curve:
                    trial.report(row.val_accuracy, step=row.epoch)
                trial.set_user_attr("stop_reason", info.stop_reason)
            if info is not None and info.pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, values=[value])
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
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
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
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value,
                                         "best_trial": best.number}),
                       sweep_dir / "optimization_results.yaml")
