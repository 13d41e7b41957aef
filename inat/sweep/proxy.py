"""Proxy-then-promote: sweep cheaply (low resolution, few epochs), retrain the top-k at full fidelity.

Stage 1 is an ordinary sweep with cheap overrides, e.g.::

    python run.py -m hydra/sweeper=optuna hydra.sweep.dir=outputs/sweeps/proxy data.image_size=32 train.epochs=3

Stage 2 reads that study, takes its k best COMPLETE trials (pruned ones trained less and are
skipped), enqueues exactly those parameter sets in a fresh study, and runs them through the
same sweeper, so each promoted trial is a normal run folder and the sweep report works on it::

    python -m inat.sweep.proxy outputs/sweeps/proxy --top-k 3 --out outputs/sweeps/full -- data.image_size=96 train.epochs=30

The best proxy trial's other overrides (data.root, pinned keys, ...) are carried over; the
ones given after ``--`` replace them. ``promotion.json`` in the output folder maps each promoted
trial to its proxy trial and both accuracies.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from inat.errors import InatError
from inat.run_folder import PROMOTION, overrides_dict, read_overrides, read_sweep_info
from inat.runs import write_json
from inat.sweep.analysis import load_sweep
from inat.sweep.study import open_study

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"


def top_configs(sweep_dir: Path, k: int, storage: Optional[str] = None,
                study_name: Optional[str] = None) -> List[Dict[str, Any]]:
    """The k best complete proxy trials as ``{"trial", "value", "params"}``, best first.

    Reads the Optuna study; without one (storage gone or unreachable) reads the trial folders.
    """
    import optuna

    data = load_sweep(Path(sweep_dir), storage, study_name)
    if data.study is not None:
        done = data.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        ranked = sorted(done, key=lambda t: t.value, reverse=True)[:k]
        return [{"trial": t.number, "value": float(t.value), "params": dict(t.params)} for t in ranked]
    rows = sorted((r for r in data.trained if r.state == "complete"), key=lambda r: r.val_accuracy, reverse=True)
    return [{"trial": r.number, "value": r.val_accuracy, "params": r.params} for r in rows[:k]]


def merge_overrides(proxy_args: Sequence[str], full_args: Sequence[str]) -> List[str]:
    """Proxy overrides with the full-fidelity ones replacing the same keys; sweep-local keys dropped."""
    def key(arg: str) -> str:
        return arg.lstrip("+~").split("=", 1)[0]

    drop = ("hydra.sweep.", "hydra.sweeper.", "wandb.group", "sweep.")
    replaced = {key(a) for a in full_args}
    kept = [a for a in proxy_args if not key(a).startswith(drop) and key(a) not in replaced]
    return kept + list(full_args)


def promote(proxy_dir: Path, out_dir: Path, top_k: int, full_args: Sequence[str], *, storage: Optional[str] = None,
            study_name: Optional[str] = None, python: str = sys.executable, run: bool = True) -> Dict[str, Any]:
    """Enqueue the proxy's top-k configurations in a new study at ``out_dir`` and train them.

    Returns what it wrote to ``out_dir/promotion.json`` (the command, and per promoted trial
    its proxy trial, proxy value and, once run, full-fidelity value).
    """
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # enqueue_trial
    proxy_dir, out_dir = Path(proxy_dir), Path(out_dir)
    info = read_sweep_info(proxy_dir)
    best = top_configs(proxy_dir, top_k, storage, study_name)
    if not best:
        raise SystemExit(f"error: '{proxy_dir}' has no complete trial to promote.")
    out_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{out_dir.resolve()}/optuna.db"
    name = f"{info.get('study_name') or 'inat'}_promoted"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = open_study(name, url, direction="maximize")
    except InatError as err:
        raise SystemExit(f"error: {err}") from None
    if study.trials:
        raise SystemExit(f"error: '{out_dir}' already holds a promotion study; pick a new --out folder.")
    for cfg in best:
        study.enqueue_trial(cfg["params"])
    # The best trial's own overrides, minus its searched keys: the exact command it ran under
    # (sweep.json only keeps the last command given to a sweep folder).
    searched = set(best[0]["params"])
    proxy_args = [f"{k}={v}" for k, v in overrides_dict(read_overrides(proxy_dir / str(best[0]["trial"]))).items() if k not in searched]
    args = merge_overrides(proxy_args, full_args)
    command = [python, str(RUN_PY), "-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={out_dir}",
               f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}", f"hydra.sweeper.n_trials={len(best)}",
               *args]
    record: Dict[str, Any] = {"proxy_dir": str(proxy_dir), "command": command, "promoted": [
        {"trial": i, "proxy_trial": c["trial"], "proxy_value": c["value"], "params": c["params"]}
        for i, c in enumerate(best)]}
    write_json(out_dir / PROMOTION, record)
    if not run:
        return record
    print("promoting:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    study = optuna.load_study(study_name=name, storage=url)
    values = {t.number: t.value for t in study.trials}
    for p in record["promoted"]:
        p["full_value"] = values.get(p["trial"])
    write_json(out_dir / PROMOTION, record)
    return record


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m inat.sweep.proxy PROXY_DIR --top-k K --out DIR -- FULL_FIDELITY_OVERRIDES``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    full = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m inat.sweep.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("proxy_dir", type=Path, help="the proxy sweep folder")
    parser.add_argument("--out", type=Path, required=True, help="new sweep folder for the promoted trials")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--storage", default=None, help="proxy study URL when sweep.json hides it (PostgreSQL)")
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--dry-run", action="store_true", help="write promotion.json and print the command only")
    ns = parser.parse_args(argv)
    record = promote(ns.proxy_dir, ns.out, ns.top_k, full, storage=ns.storage, study_name=ns.study_name,
                     run=not ns.dry_run)
    for p in record["promoted"]:
        full_value = p.get("full_value")
        print(f"promoted trial {p['trial']} <- proxy trial {p['proxy_trial']}: proxy {100 * p['proxy_value']:.1f}%"
              + (f", full {100 * full_value:.1f}%" if full_value is not None else ""))


if __name__ == "__main__":
    main()
