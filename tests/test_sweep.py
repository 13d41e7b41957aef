"""The Part A sweep end to end on a tiny generated dataset, plus the sweep helpers' units.

One module-scoped sweep folder is built by real ``python run.py -m hydra/sweeper=optuna``
commands: a good trial, then two deliberately bad ones (learning rate 1e-7) that the median
rule must stop, then a command whose compute budget is already spent. The report, the
proxy promotion and the wandb export then run on that folder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Cheap pins: a small model keeps each trial to a few seconds on 2 CPUs.
SMALL = ["data.image_size=32", "data.workers=1", "train.threads=1", "wandb.mode=disabled", "filters.base=16",
         "model.kernel_size=3", "model.dense_units=64", "train.batch_size=8", "optim.warmup_epochs=0",
         "train.eval_batch_size=64"]


def make_dataset(root: Path, per_class: int = 20, size: int = 32) -> Path:
    """Three solid-colour classes with noise: learnable in one epoch, chance is 1/3."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, n in (("train", per_class), ("val", 4)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_py(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "INAT_CACHE": str(cache), "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, env) -> SimpleNamespace:
    """A sweep folder: trial 0 good, trials 1-2 bad and pruned, trial 3 stopped by the budget."""
    base = tmp_path_factory.mktemp("sweep")
    data = make_dataset(base / "data")
    sweep_dir = base / "woof_like"
    common = ["-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}", f"data.root={data}", "train.epochs=3",
              "sweep.prune_warmup_epochs=0", "sweep.prune_min_trials=1", *SMALL]
    first = run_py(*common, "hydra.sweeper.n_trials=1", "train.lr=0.01", env=env)
    # Rerunning with the same sweep folder continues the study (SQLite in the folder).
    bad = run_py(*common, "hydra.sweeper.n_trials=2", "train.lr=0.0000001", env=env)
    budget = run_py(*common, "hydra.sweeper.n_trials=5", "sweep.budget_minutes=0.0001", env=env)
    return SimpleNamespace(dir=sweep_dir, data=data, logs=(first, bad, budget), common=common)


def load_study(sweep_dir: Path):
    import optuna

    return optuna.load_study(study_name="inat_part_a", storage=f"sqlite:///{sweep_dir}/optuna.db")


def summary(sweep_dir: Path, n: int) -> dict:
    return json.loads((sweep_dir / str(n) / "summary.json").read_text())


def test_preset_is_ours_and_holds_the_part_a_space(env):
    out = run_py("hydra/sweeper=optuna", "--cfg", "hydra", "-p", "hydra.sweeper", env=env).stdout
    assert "hydra_plugins.inat_sweeper.optuna_sweeper.InatOptunaSweeper" in out
    for key in ("filters: choice(same, doubling, halving)", "act: choice(relu, gelu, silu, mish)",
                "aug: choice(none, basic)", "train.lr: tag(log, interval(", "train.batch_size: choice(32, 64, 128)",
                "direction: maximize", "storage: sqlite:///${hydra.sweep.dir}/optuna.db", "seed: 0"):
        assert key in out, key


def test_median_rule_stops_the_bad_trials(sweep):
    study = load_study(sweep.dir)
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "COMPLETE" and summary(sweep.dir, 0)["epochs"] == 3
    for n in (1, 2):
        s = summary(sweep.dir, n)
        assert s["stop_reason"].startswith("pruned"), s["stop_reason"]
        assert s["epochs"] < 3
        assert states[n] == "PRUNED"
        assert study.trials[n].user_attrs["stop_reason"].startswith("pruned")


def test_trials_are_normal_run_folders_grouped_in_wandb(sweep):
    import yaml

    for n in (0, 1, 2):
        folder = sweep.dir / str(n)
        assert (folder / "metrics.csv").is_file() and (folder / "checkpoints" / "best.pt").is_file()
        cfg = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        assert cfg["wandb"]["group"] == sweep.dir.name
        assert not (folder / "test.json").exists()  # sweep trials never score the test folder
    info = json.loads((sweep.dir / "sweep.json").read_text())
    assert info["study_name"] == "inat_part_a" and "act" in info["params"]


def test_budget_stops_trials_started_after_it(sweep):
    study = load_study(sweep.dir)
    assert len(study.trials) == 4  # the budget command asked one trial, then stopped asking
    s = summary(sweep.dir, 3)
    assert s["stop_reason"].startswith("budget:") and s["best_val_accuracy"] == 0.0 and s["epochs"] == 0
    assert study.trials[3].state.name == "PRUNED"
    assert not (sweep.dir / "3" / "metrics.csv").exists()  # not trained at all


def test_sweep_report_files(sweep, env):
    proc = run_py("+mode=sweep_report", f"sweep.dir={sweep.dir}", env=env)
    report = json.loads((sweep.dir / "sweep_report.json").read_text())
    for name in report["files"].values():
        assert (sweep.dir / name).stat().st_size > 0, name
    html = (sweep.dir / "sweep_report.html").read_text()
    # plotly.js inline (its source only names a CDN as the default for geo maps we never draw)
    assert "<script src=" not in html.replace(" ", "").replace("<script", "<script ") and "Plotly.newPlot" in html
    assert not re.search(r"<script[^>]*\bsrc=", html)
    assert report["trials"] == {"complete": 1, "pruned": 2, "budget": 1, "running": 0}
    assert report["best"]["trial"] == 0
    assert report["best"]["command"].startswith("python run.py ") and "train.lr=0.01" in report["best"]["command"]
    assert {c["param"] for c in report["correlations"]} >= {"act", "filters", "model.batch_norm"}
    texts = [o["text"] for o in report["observations"]]
    assert any("median rule stopped 2 of 3 trials" in t for t in texts), texts
    # sweep.json records TPE's start-up count (the plugin's default), which picks the trials effects use
    assert json.loads((sweep.dir / "sweep.json").read_text())["n_startup_trials"] == 10
    assert all(o["evidence"] for o in report["observations"])
    assert "sweep report:" in proc.stdout
    wandb_sweep = (sweep.dir / "wandb_sweep.yaml").read_text()
    assert "log_uniform_values" in wandb_sweep and "${args_no_hyphens}" in wandb_sweep


def test_promote_top_config_to_full_fidelity(sweep, tmp_path, env):
    from inat.sweep.proxy import promote

    out = tmp_path / "promoted"
    old = dict(os.environ)
    os.environ.update(env)
    try:
        record = promote(sweep.dir, out, 1, ["train.epochs=2"])
    finally:
        os.environ.clear()
        os.environ.update(old)
    (p,) = record["promoted"]
    assert p["proxy_trial"] == 0 and p["full_value"] is not None
    assert summary(out, 0)["epochs"] == 2  # full fidelity, not the proxy's 3 (pruning off: 1 trial)
    proxy_params = load_study(sweep.dir).trials[0].params
    import optuna

    promoted = optuna.load_study(study_name="inat_part_a_promoted", storage=f"sqlite:///{out}/optuna.db").trials[0]
    assert {k: v for k, v in promoted.params.items() if k != "train.lr"} == {
        k: v for k, v in proxy_params.items() if k != "train.lr"}
    cfg_lr = summary(out, 0)["config"]["train"]["lr"]
    assert cfg_lr == pytest.approx(0.01)  # the proxy's pinned lr is carried over


# ---- units -------------------------------------------------------------------------------

def write_trial(sweep_dir: Path, n: int, accs: list[float], finished: bool = True) -> Path:
    from inat.runs import write_json, write_metrics

    folder = sweep_dir / str(n)
    folder.mkdir(parents=True)
    write_metrics(folder / "metrics.csv", [{"epoch": e + 1, "val_accuracy": a, "val_loss": 1.0} for e, a in enumerate(accs)])
    if finished:
        write_json(folder / "summary.json", {"best_val_accuracy": max(accs), "stop_reason": "epochs"})
    return folder


def test_should_stop_median_rule(tmp_path):
    from omegaconf import OmegaConf

    from inat.sweep.prune import should_stop

    cfg = OmegaConf.create({"sweep": {"prune": True, "prune_warmup_epochs": 1, "prune_min_trials": 2},
                            "train": {"epochs": 5}})
    write_trial(tmp_path, 0, [0.3, 0.5, 0.6])
    me = write_trial(tmp_path, 9, [0.1], finished=False)
    assert should_stop(cfg, me, {"epoch": 2, "val_accuracy": 0.1}) is None  # 1 finished trial < 2
    write_trial(tmp_path, 1, [0.2, 0.3])
    write_trial(tmp_path, 2, [0.2, 0.9, 0.9], finished=False)  # running: not evidence
    assert should_stop(cfg, me, {"epoch": 1, "val_accuracy": 0.0}) is None  # warm-up epoch
    reason = should_stop(cfg, me, {"epoch": 2, "val_accuracy": 0.35})  # median of 0.5, 0.3 = 0.4
    assert reason and "below the median 40.0%" in reason
    assert should_stop(cfg, me, {"epoch": 2, "val_accuracy": 0.4}) is None  # not strictly below
    assert should_stop(cfg, me, {"epoch": 5, "val_accuracy": 0.0}) is None  # last epoch: nothing to save


def test_helpers():
    from inat.sweep.analysis import correlation_ratio, spearman
    from inat.sweep.proxy import merge_overrides
    from inat.sweep.sweeper import hide_password
    from inat.sweep.wandb_export import preset_params, wandb_sweep_config

    assert hide_password("postgresql://inat:secret@127.0.0.1:5432/inat") == "postgresql://inat:***@127.0.0.1:5432/inat"
    assert hide_password("sqlite:///x/optuna.db") == "sqlite:///x/optuna.db"
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert correlation_ratio(["a", "a", "b", "b"], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert merge_overrides(["data.root=d", "train.epochs=1", "wandb.group=x", "sweep.prune=true"],
                           ["train.epochs=30"]) == ["data.root=d", "train.epochs=30"]
    space = wandb_sweep_config(preset_params())["parameters"]
    assert space["act"] == {"values": ["relu", "gelu", "silu", "mish"]}
    assert space["model.batch_norm"] == {"values": [True, False]}
    assert space["train.lr"]["distribution"] == "log_uniform_values"


def test_savings_counts_full_cost_trials_to_reach_a_level():
    """experiments/sweep/savings.py: a pruned trial costs the share of epochs it trained."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("savings", Path(__file__).resolve().parents[1] / "experiments/sweep/savings.py")
    savings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(savings)
    row = lambda n, state, acc, epochs: SimpleNamespace(number=n, state=state, val_accuracy=acc, epochs=epochs)  # noqa: E731
    tpe = [row(0, "complete", 0.20, 5), row(1, "pruned", 0.10, 1), row(2, "pruned", 0.12, 2), row(3, "complete", 0.31, 5)]
    rand = [row(1, "complete", 0.25, 5), row(0, "complete", 0.15, 5), row(2, "complete", 0.30, 5)]
    assert savings.trial_cost(tpe[1], 5) == pytest.approx(0.2)
    assert savings.cost_to_reach(tpe, 0.30, 5) == (pytest.approx(2.6), 4)  # 1 + 0.2 + 0.4 + 1
    assert savings.cost_to_reach(rand, 0.30, 5) == (3.0, 3)  # in trial-number order, not list order
    assert savings.cost_to_reach(rand, 0.31, 5) is None


def test_savings_counts_a_trial_exactly_at_a_level():
    """84/240 stored as float32 (0.34999999...) reaches the 35% level; the raw ``>=`` dropped it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("savings", Path(__file__).resolve().parents[1] / "experiments/sweep/savings.py")
    savings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(savings)
    at_level = float(np.float32(84 / 240))
    assert at_level < 0.35 and savings.reaches(at_level, 0.35)
    assert savings.reaches(float(np.float32(78 / 240)), 0.325) and not savings.reaches(83 / 240, 0.35)
    rows = [SimpleNamespace(number=0, state="complete", val_accuracy=at_level, epochs=5)]
    assert savings.cost_to_reach(rows, 0.35, 5) == (1.0, 1)


def _sweep_data(rows, info=None):
    from inat.sweep.analysis import Row, SweepData

    return SweepData(Path("woof"), info or {}, rows, sorted({k for r in rows for k in r.params}), {})


def test_progress_axis_cuts_a_pause_between_sittings():
    """Two sittings 110 minutes apart: the pause is cut out of the axis and reported, not stretched."""
    from inat.sweep.plots import cut_gaps

    minutes = [0, 1, 2, 3, 113, 114, 115]
    drawn, gaps = cut_gaps(minutes)
    assert len(gaps) == 1 and gaps[0].minutes == pytest.approx(110) and max(drawn) == pytest.approx(6)
    assert drawn == sorted(drawn) and gaps[0].at == pytest.approx(4)
    assert cut_gaps([0, 2, 4, 6])[1] == []  # a steady sweep has no pause


def test_parallel_coordinates_log_axes_labels_and_colour_bar():
    """lr and weight decay (sampled on a log scale) get log10 axes with labelled middle levels; a colour bar."""
    import datetime as dt

    import matplotlib.pyplot as plt

    from inat.sweep.analysis import Row
    from inat.sweep.plots import axes_values, parallel_figure, progress_figure

    rng = np.random.default_rng(0)
    t0 = dt.datetime(2026, 1, 1)
    rows = [Row(i, "complete", {"train.lr": float(10 ** rng.uniform(-3.5, -2)), "optim.weight_decay":
                                float(10 ** rng.uniform(-5, -1)), "act": ["relu", "gelu"][i % 2],
                                "model.dense_units": [64, 128, 256][i % 3]},
                0.2 + 0.01 * i, 1.0, 5, 10.0, t0 + dt.timedelta(minutes=i + (120 if i > 10 else 0)), "epochs", str(i))
            for i in range(20)]
    info = {"params": {"train.lr": "tag(log, interval(0.0003, 0.01))",
                       "optim.weight_decay": "tag(log, interval(0.00001, 0.1))", "act": "choice(relu, gelu)",
                       "model.dense_units": "choice(64, 128, 256)"}}
    axes = {a.name: a for a in axes_values(_sweep_data(rows, info))}
    lr, wd, units = axes["train.lr"], axes["optim.weight_decay"], axes["model.dense_units"]
    assert lr.log and wd.log and not units.log and not axes["act"].log
    assert max(lr.values) < 0 and len(lr.ticktext) >= 3 and "0.001" in lr.ticktext  # log10 values, middle levels
    assert "0.0001" in wd.ticktext and "0.001" in wd.ticktext
    for log_axis in (lr, wd):  # a few distinct plain labels, not 1-2-5 on every decade (12 on weight decay)
        assert 3 <= len(log_axis.ticktext) <= 6 and len(set(log_axis.ticktext)) == len(log_axis.ticktext)
        assert not any("e" in t for t in log_axis.ticktext), log_axis.ticktext
        assert all(min(log_axis.values) <= v <= max(log_axis.values) for v in log_axis.tickvals)
    assert units.ticktext == ["64", "128", "256"] and axes["act"].ticktext == ["gelu", "relu"]
    fig = parallel_figure(_sweep_data(rows, info))
    assert len(fig.axes) == 2  # the plot and its colour bar
    assert "val accuracy" in fig.axes[1].get_ylabel()
    order = list(axes)
    for name in ("train.lr", "optim.weight_decay"):  # the labels drawn beside each log axis
        j = order.index(name)
        drawn = [t.get_text() for t in fig.axes[0].texts if abs(t.get_position()[0] - (j - 0.03)) < 1e-9]
        assert drawn == axes[name].ticktext
    plt.close(fig)
    fig = progress_figure(_sweep_data(rows, info))
    assert "pause" in " ".join(t.get_text() for t in fig.axes[0].texts) and max(fig.axes[0].get_xlim()) < 60
    plt.close(fig)


def test_concurrent_atomic_writes_of_one_file(tmp_path):
    """Sweep workers on many machines all write the study's sweep.json at once (a CI failure)."""
    from concurrent.futures import ThreadPoolExecutor
    from inat.runs import write_json

    target = tmp_path / "sweep.json"

    def writer(worker: int) -> None:
        for i in range(40):
            write_json(target, {"worker": worker, "i": i, "pad": "x" * 20000})

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(writer, range(6)))  # re-raises a worker's FileNotFoundError
    assert json.loads(target.read_text())["i"] == 39
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # no temp file left behind


@pytest.mark.parametrize("sampler_name", ["RandomSampler", "TPESampler"])
def test_continued_study_does_not_replay_and_stays_reproducible(tmp_path, sampler_name):
    """A rerun on the study's SQLite file continues it: new proposals, the same ones every time."""
    import optuna

    from inat.sweep.sweeper import continue_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        return trial.suggest_float("x", 0, 1) + trial.suggest_categorical("c", ["a", "b", "c", "d"]).count("a")

    def session(name: str, n: int):
        sampler = getattr(optuna.samplers, sampler_name)(seed=0)
        study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / name}", sampler=sampler,
                                    direction="maximize", load_if_exists=True)
        continue_sampler(sampler, 0, len(study.trials))
        study.optimize(objective, n_trials=n)
        return [t.params["x"] for t in study.trials]

    first = session("a.db", 4)
    both = session("a.db", 4)
    assert both[:4] == first and not set(both[4:]) & set(first)  # continued, nothing replayed
    assert session("b.db", 4) == first and session("b.db", 4) == both  # the same continuation again


def test_budget_counts_compute_of_finished_trials():
    """Resuming a study the next day must not find its budget spent by the calendar."""
    import datetime as dt

    from inat.sweep.sweeper import budget_spent, compute_minutes

    day = dt.datetime(2026, 11, 1, 12)
    trials = [SimpleNamespace(datetime_start=day, datetime_complete=day + dt.timedelta(minutes=10)),
              SimpleNamespace(datetime_start=day + dt.timedelta(days=1), datetime_complete=day + dt.timedelta(days=1, minutes=5)),
              SimpleNamespace(datetime_start=day, datetime_complete=None)]  # running (or a crashed worker's)
    study = SimpleNamespace(get_trials=lambda deepcopy=False: trials)
    assert compute_minutes(study) == pytest.approx(15)
    assert not budget_spent(study, 20) and budget_spent(study, 15) and not budget_spent(study, 0)


@pytest.mark.parametrize("case", ["missing_root", "no_train_folder"])
def test_a_bad_dataset_stops_the_sweep_before_the_study_exists(tmp_path, env, case):
    """It used to fail inside trial 0, leaving optuna.db, sweep.json and a trial folder behind."""
    root = tmp_path / "nowhere"
    if case == "no_train_folder":
        root = tmp_path / "data"
        (root / "val" / "a").mkdir(parents=True)
    sweep_dir = tmp_path / "sweep"
    proc = run_py("-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}", f"data.root={root}",
                  "hydra.sweeper.n_trials=1", env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert not sweep_dir.exists()


@pytest.mark.parametrize("name", ["woof", "woof_random"])
def test_fanova_importance_on_the_committed_sweeps(name):
    """fANOVA itself (inat.sweep.fanova), not a fallback, on the committed trials.csv: shares of 1."""
    from inat.sweep.analysis import load_sweep, param_importance

    data = load_sweep(ROOT / "experiments" / "sweep" / name)
    importance, note = param_importance(data)
    assert note is not None and note.startswith("fANOVA") and "failed" not in note and "unavailable" not in note, note
    assert set(importance) == set(data.param_names)
    shares = np.array(list(importance.values()))
    assert np.isfinite(shares).all() and (shares >= 0).all() and shares.sum() == pytest.approx(1.0)
    assert shares.max() > 1.5 / len(shares)  # the forest found structure, not an even split


def test_fanova_importance_with_no_variance_says_so():
    """The promoted sweep's 2 trials tie (40.0% each): no importance, and a sentence saying why."""
    from inat.sweep.analysis import load_sweep, param_importance

    importance, note = param_importance(load_sweep(ROOT / "experiments" / "sweep" / "woof_promoted"))
    assert importance == {} and "same val accuracy" in note


def _effect_rows(n, level_of, acc_of, start=0):
    from inat.sweep.analysis import Row

    return [Row(i, "complete", {"model.batch_norm": level_of(i), "act": ["relu", "gelu"][i % 2]}, acc_of(i), 1.0, 5, 1.0,
                None, "epochs", str(i)) for i in range(start, start + n)]


def test_random_sweep_effects_have_n_interval_and_ties():
    """Every random trial counts; a clear gap is an effect with its interval, overlapping levels are a tie."""
    from inat.sweep.observations import level_effects, observations

    rng = np.random.default_rng(0)
    rows = _effect_rows(40, lambda i: i % 4 < 2, lambda i: (0.30 if i % 4 < 2 else 0.20) + rng.normal(0, 0.01))
    data = _sweep_data(rows, {"sampler": "RandomSampler", "params": {}})
    texts = [o["text"] for o in observations(data, [])]
    bn = next(t for t in texts if t.startswith("model.batch_norm"))
    assert bn.startswith("model.batch_norm=True beats False (random sweep, n=40)") and "(n=20)" in bn
    effect = level_effects("model.batch_norm", rows)
    low, high = effect["levels"][1]["ci"]
    assert low < effect["levels"][1]["diff"] < high < 0 and high - low < 0.02 and f"95% CI {100 * low:+.1f} to {100 * high:+.1f}" in bn
    act = next(t for t in texts if t.startswith("act"))  # act alternates with i, not with the accuracy gap
    assert act.startswith("act: no level is clearly better") and "a tie" in act


def test_tpe_effects_come_from_start_up_trials_only():
    """After its start-up TPE samples the good level more: those trials never enter an effect."""
    from inat.sweep.observations import independent_trials, observations, tpe_startup_default

    rng = np.random.default_rng(1)
    startup = _effect_rows(6, lambda i: i % 2 == 0, lambda i: 0.2 + rng.normal(0, 0.02))
    tuned = _effect_rows(30, lambda i: i % 10 != 0, lambda i: (0.35 if i % 10 != 0 else 0.1), start=6)
    info = {"sampler": "TPESampler", "n_startup_trials": 6, "params": {}}
    data = _sweep_data(startup + tuned, info)
    assert [r.number for r in independent_trials(data).rows] == list(range(6))
    texts = [o["text"] for o in observations(data, [])]
    assert any(t.startswith("model.batch_norm: no level is clearly better (TPE start-up trials, n=6)") for t in texts)
    assert not any("beats" in t for t in texts), texts
    assert any("say where the sampler went" in t for t in texts)
    del info["n_startup_trials"]  # an older sweep.json: Optuna's own default
    assert tpe_startup_default() == 10 and len(independent_trials(_sweep_data(startup + tuned, info)).rows) == 10


def test_committed_sweeps_state_effects_from_independent_trials():
    """woof_random: effects over its 350 random trials; woof (TPE): only its 8 start-up trials."""
    from inat.sweep.analysis import correlations, load_sweep
    from inat.sweep.observations import observations

    sweeps = ROOT / "experiments" / "sweep"
    random_texts = [o["text"] for o in observations(*(lambda d: (d, correlations(d)))(load_sweep(sweeps / "woof_random")))]
    assert any(t.startswith("filters=doubling beats halving (random sweep, n=350)") for t in random_texts), random_texts
    assert any(t.startswith("fANOVA importance") and "350 complete trials" in t for t in random_texts)
    woof = load_sweep(sweeps / "woof")
    texts = [o["text"] for o in observations(woof, [])]
    effects = [t for t in texts if "points" in t or "Spearman" in t]
    assert effects and all("(TPE start-up trials, n=8)" in t for t in effects), effects
    promoted = load_sweep(sweeps / "woof_promoted")
    assert observations(promoted, [])[0]["text"].startswith("No per-level effects for this sweep")
