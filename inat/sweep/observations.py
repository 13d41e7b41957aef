"""The sweep report's observations: sentences generated from the numbers, each with its evidence.

Marginal effects of each hyperparameter come from trials sampled independently of results.

A model-based sampler (TPE) proposes the levels that did well more often, so its per-level
means over all trials compare a tuned level with a few exploratory trials of the others: they
say where the sampler went, not what a level does. Effects are therefore computed only from
trials drawn without looking at results: every trial of a random (or grid) sweep, or a TPE
sweep's random start-up trials (``n_startup_trials``, recorded in sweep.json; TPE's own default
when absent). Each level gets its mean val accuracy and n, and each difference from the best
level a 95% Welch t interval; a difference whose interval holds 0 is called a tie.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from inat.run_folder import PROMOTION
from inat.sweep.analysis import Row, SweepData, best_row, is_numeric, spearman

# Samplers whose proposals never depend on earlier results: all their trials are independent draws.
INDEPENDENT_SAMPLERS = ("RandomSampler", "GridSampler")
MAX_LEVELS = 6  # keys with more distinct values are treated as numeric (rank correlation)


@dataclass
class Basis:
    """The trials effects are computed from, and how the report names them."""

    rows: List[Row]
    label: str  # e.g. "random sweep, n=350" or "TPE start-up trials, n=8"
    reason: str = ""  # why there are none, when rows is empty
    source: str = "sampler in sweep.json"  # where the choice of trials comes from


def tpe_startup_default() -> int:
    """Optuna's TPESampler default for ``n_startup_trials`` (used when sweep.json has none)."""
    import optuna

    return int(inspect.signature(optuna.samplers.TPESampler).parameters["n_startup_trials"].default)


def independent_trials(data: SweepData) -> Basis:
    """The trained trials whose parameters were drawn without looking at any result."""
    sampler = data.info.get("sampler")
    rows = data.trained
    if (data.sweep_dir / PROMOTION).is_file():
        return Basis([], "", "its trials are configurations promoted for their proxy result", PROMOTION)
    if not data.info:  # Hydra's basic sweeper: the full grid of the values given
        return Basis(rows, f"every trial of the multirun, n={len(rows)}", source="no sweep.json: Hydra's grid")
    if sampler in INDEPENDENT_SAMPLERS:
        kind = "random" if sampler == "RandomSampler" else "grid"
        return Basis(rows, f"{kind} sweep, n={len(rows)}")
    if sampler == "TPESampler":
        # Trial k was asked when at most k trials had finished: below n_startup_trials it is random.
        recorded = data.info.get("n_startup_trials")
        startup = int(recorded or tpe_startup_default())
        chosen = [r for r in rows if r.number < startup]
        source = (f"n_startup_trials={startup} in sweep.json" if recorded
                  else f"TPESampler's default n_startup_trials={startup} (sweep.json records none)")
        return Basis(chosen, f"TPE start-up trials, n={len(chosen)}", source=source)
    return Basis([], "", f"its {sampler or 'unrecorded'} sampler chose trials from earlier results")


def welch_interval(a: List[float], b: List[float]) -> Optional[Tuple[float, float]]:
    """95% Welch t interval for mean(a) - mean(b); None when a side has under 2 values or no spread."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return None
    with warnings.catch_warnings():  # near-identical accuracies: scipy warns, the interval is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    low, high = float(ci.low), float(ci.high)
    return None if math.isnan(low) or math.isnan(high) else (low, high)


def level_effects(name: str, rows: List[Row]) -> Optional[Dict[str, Any]]:
    """Per level of ``name``: mean, n, and the difference from the best level with its interval."""
    groups: Dict[str, List[float]] = {}
    for r in rows:
        if name in r.params:
            groups.setdefault(str(r.params[name]), []).append(r.val_accuracy)
    if len(groups) < 2 or sum(len(v) >= 2 for v in groups.values()) < 2:
        return None
    means = {k: float(np.mean(v)) for k, v in groups.items()}
    best = max((k for k in groups if len(groups[k]) >= 2), key=means.get)
    levels = []
    for k in sorted(groups, key=means.get, reverse=True):
        ci = None if k == best else welch_interval(groups[k], groups[best])
        levels.append({"value": k, "mean": means[k], "n": len(groups[k]), "diff": means[k] - means[best],
                       "ci": ci, "tie": ci is None or ci[0] <= 0 <= ci[1]})
    return {"param": name, "best": best, "levels": levels}


def _level_text(level: Dict[str, Any]) -> str:
    text = f"{level['value']} {100 * level['diff']:+.1f} points (n={level['n']}"
    if level["ci"] is None:  # under 2 trials on a side, or every accuracy on both sides equal
        return text + (", too few trials for an interval)" if level["n"] < 2 else ", no spread for an interval)")
    low, high = (100 * x for x in level["ci"])
    return text + f", 95% CI {low:+.1f} to {high:+.1f}" + (", a tie)" if level["tie"] else ")")


def effect_observation(effect: Dict[str, Any], basis: Basis, note: str) -> Dict[str, Any]:
    """One sentence per key: which levels the best one beats, which are ties, with the numbers."""
    name, best = effect["param"], effect["best"]
    top = next(lv for lv in effect["levels"] if lv["value"] == best)
    others = [lv for lv in effect["levels"] if lv["value"] != best]
    beaten = [lv for lv in others if not lv["tie"]]
    lead = (f"{name}={best} beats {', '.join(lv['value'] for lv in beaten)}" if beaten
            else f"{name}: no level is clearly better")
    text = (f"{lead} ({basis.label}): {best} {100 * top['mean']:.1f}% mean val accuracy (n={top['n']}); "
            + "; ".join(_level_text(lv) for lv in others) + ".")
    evidence = ("; ".join(f"{name}={lv['value']}: mean {100 * lv['mean']:.1f}% (n={lv['n']})"
                          for lv in effect["levels"])
                + f"; differences vs {name}={best} with Welch's t 95% intervals; trials chosen by "
                + basis.source + note)
    score = max((-100 * lv["ci"][1] for lv in beaten), default=0.0)  # the smallest gap the data support
    return {"score": score, "text": text, "evidence": evidence}


def rank_observation(name: str, basis: Basis) -> Optional[Dict[str, Any]]:
    """Spearman's rho of a numeric key with val accuracy, with a Fisher-z 95% interval."""
    have = [r for r in basis.rows if name in r.params]
    rho = spearman([r.params[name] for r in have], [r.val_accuracy for r in have]) if len(have) >= 5 else None
    if rho is None:
        return None
    half = 1.96 / math.sqrt(len(have) - 3)
    low, high = (math.tanh(math.atanh(max(min(rho, 0.999999), -0.999999)) + s * half) for s in (-1, 1))
    tie = low <= 0 <= high
    lead = (f"{name}: no clear direction (a tie)" if tie
            else f"Higher {name} goes with {'higher' if rho > 0 else 'lower'} val accuracy")
    return {"score": 0.0 if tie else 10 * min(abs(low), abs(high)),
            "text": f"{lead} ({basis.label}): Spearman rho {rho:+.2f}, 95% CI {low:+.2f} to {high:+.2f}.",
            "evidence": f"rank correlation of {name} with best val accuracy per trial; Fisher z interval; "
                        f"trials chosen by {basis.source}"}


def marginal_observations(data: SweepData) -> List[Dict[str, Any]]:
    """Effect sentences from the independent trials, or one sentence saying why there are none."""
    basis = independent_trials(data)
    if not basis.rows:
        why = basis.reason or "none of its trials was sampled independently of results"
        return [{"score": 0.0, "text": f"No per-level effects for this sweep: {why}.",
                 "evidence": f"{basis.source}: {data.info.get('sampler', 'unrecorded')}"}]
    pruned = sum(r.state == "pruned" for r in basis.rows)
    note = (f"; {pruned} of these trials were pruned and count with the accuracy they had when stopped"
            if pruned else "")
    out = []
    for name in data.param_names:
        values = [r.params[name] for r in basis.rows if name in r.params]
        if is_numeric(values) and len(set(values)) > MAX_LEVELS:
            found = rank_observation(name, basis)
        else:
            effect = level_effects(name, basis.rows)
            found = effect_observation(effect, basis, note) if effect else None
        if found:
            out.append(found)
    return out


def sampler_observation(data: SweepData) -> Optional[Dict[str, Any]]:
    """Where a result-driven sampler concentrated (not an effect): the most-proposed level per key."""
    if data.info.get("sampler") != "TPESampler" or len(data.trained) < 20:
        return None
    rows = data.trained
    shares = []
    for name in data.param_names:
        counts = Counter(str(r.params[name]) for r in rows if name in r.params)
        values = [r.params[name] for r in rows if name in r.params]
        if counts and not (is_numeric(values) and len(counts) > MAX_LEVELS):
            level, n = counts.most_common(1)[0]
            shares.append((n / len(rows), f"{name}={level} in {n}"))
    shares.sort(reverse=True)
    listed = ", ".join(text for _, text in shares[:4])
    return {"score": 0.0, "text": f"After its start-up TPE concentrated its proposals ({listed} of {len(rows)} "
            "trained trials), so per-level means over all its trials say where the sampler went, not what a "
            "level does.",
            "evidence": "level counts over all trained trials"}


def importance_observation(corr: List[Dict[str, Any]], n_complete: int) -> Optional[Dict[str, Any]]:
    """fANOVA's largest shares: a model of all complete trials that accounts for the other keys."""
    ranked = sorted((c for c in corr if c.get("importance") is not None), key=lambda c: -c["importance"])
    if not ranked:
        return None
    listed = ", ".join(f"{c['param']} {c['importance']:.2f}" for c in ranked[:3])
    return {"score": 0.0, "text": f"fANOVA importance (share of val accuracy variance, a random forest over the "
            f"{n_complete} complete trials, so each key is judged with the others varying): {listed}.",
            "evidence": f"{ranked[0].get('importance_note') or 'fANOVA'}; importance column of the correlations"}


def observations(data: SweepData, corr: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """Sentences derived from the data, each with its evidence; the clearest effects first."""
    rows = data.trained
    if not rows:
        return [{"text": "No trial finished yet.", "evidence": f"{len(data.rows)} trial folders"}]
    obs = sorted(marginal_observations(data), key=lambda o: -o["score"])
    n_complete = sum(r.state == "complete" for r in rows)
    obs += [o for o in (importance_observation(corr, n_complete), sampler_observation(data)) if o]
    best = best_row(data)
    if best is not None:
        ordered = sorted((r for r in rows if r.started), key=lambda r: r.started)
        first = next((i for i, r in enumerate(ordered) if r.val_accuracy >= best.val_accuracy), None)
        if first is not None:
            obs.append({"text": f"The best val accuracy ({100 * best.val_accuracy:.1f}%, trial "
                        f"{best.number}) was first reached by trial {first + 1} of {len(ordered)} in start order.",
                        "evidence": "trials ordered by start time"})
    n_pruned = sum(r.state == "pruned" for r in rows)
    if n_pruned and data.epochs_planned:
        pruned = [r for r in rows if r.state == "pruned"]
        saved = sum(data.epochs_planned - r.epochs for r in pruned)
        run = sum(r.epochs for r in rows)
        obs.append({"text": f"The median rule stopped {n_pruned} of {len(rows)} trials after "
                    f"{np.mean([r.epochs for r in pruned]):.1f} of {data.epochs_planned} epochs on average: "
                    f"{saved} epochs not trained, {100 * saved / (run + saved):.0f}% of the {run + saved} the "
                    f"sweep would otherwise have trained.",
                    "evidence": "epochs in each pruned trial's metrics.csv vs train.epochs (trials cut by "
                                "train.max_minutes are not counted as savings)"})
    budget = [r for r in data.rows if r.state == "budget"]
    if budget:
        obs.append({"text": f"The {data.info.get('budget_minutes', '?')}-minute sweep budget ended "
                    f"the sweep: trial {budget[0].number} was not trained.", "evidence": budget[0].stop_reason})
    return [{"text": o["text"], "evidence": o["evidence"]} for o in obs]
