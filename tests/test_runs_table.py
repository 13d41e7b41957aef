"""+mode=runs and the seed groups over generated run folders (JSON written directly, one tiny real multirun)."""
from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import FAST, make_dataset, run_cli
from inat.config import Config
from inat.errors import InatError
from inat.report.collect import load_run
from inat.report.repeats import repeats_section
from inat.run_folder import (HYDRA_CONFIG, HYDRA_OVERRIDES, SUMMARY, MetricsRow, Summary, trial_row, write_metrics,
                             write_summary, write_trials_csv, read_run)
from inat.runs import acquire_run_lock
from inat.runs_table import build_table, find_rows, format_table, spread, write_csv

BASE = OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)
ENV = {"python": "3.11.7", "torch": "2.5.0", "cpu": "Test CPU", "cpu_count": 4, "gpu": None}
T_975 = {2: 4.302652729911275, 1: 12.706204736174707}  # Student t quantile 0.975 by degrees of freedom (tables)


def config(seed: int = 0, **dotted) -> dict:
    """The default resolved config with ``seed`` and dotted keys (``train.lr``) set."""
    cfg = copy.deepcopy(BASE)
    cfg["seed"] = seed
    for key, value in dotted.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def write_run(path: Path, cfg: dict, val: float, test: dict | None = None, epochs: int = 3, **summary) -> Path:
    """A finished run folder: .hydra, metrics.csv, summary.json (through its owner), optional test/test.json."""
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    (path / HYDRA_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (path / HYDRA_OVERRIDES).write_text(OmegaConf.to_yaml(OmegaConf.create([f"seed={cfg['seed']}"])))
    write_metrics(path, [MetricsRow(e + 1, val * (e + 1) / epochs) for e in range(epochs)])
    write_summary(path, Summary(best_val_accuracy=val, val_accuracy=val, epochs=epochs, model=cfg["model"]["name"],
                                device="cpu", environment=ENV, config=cfg, precision="32",
                                train_images_per_sec=100.0, **summary))
    if test is not None:
        (path / "test").mkdir()
        (path / "test" / "test.json").write_text(json.dumps({"n": 30, **test}))
    return path


A_VAL, A_TEST, A_F1, A_ECE = [0.50, 0.62, 0.71], [0.48, 0.60, 0.66], [0.45, 0.58, 0.64], [0.08, 0.05, 0.11]
B_VAL = [0.30, 0.36]


@pytest.fixture
def root(tmp_path) -> Path:
    """A sweep of 3 seeds (config A), 2 plain runs of config B (another lr), one run of config C (another act)."""
    out = tmp_path / "outputs"
    for seed in range(3):
        write_run(out / "sweeps" / "s1" / str(seed), config(seed, wandb__mode="disabled"), A_VAL[seed],
                  {"accuracy": A_TEST[seed], "macro_f1": A_F1[seed], "ece": A_ECE[seed]})
    (out / "sweeps" / "s1" / "multirun.yaml").write_text("hydra: {}\n")
    for seed, val in enumerate(B_VAL):
        write_run(out / "train" / f"b{seed}", config(seed + 5, train__lr=0.01), val)
    write_run(out / "train" / "c", config(0, act__name="gelu"), 0.9)
    return out


def test_seed_groups_mean_std_and_t_interval_match_numpy(root):
    table = build_table(root)
    assert len(table.rows) == 6 and {r.status for r in table.rows} == {"done"}
    assert len(table.groups) == 2  # config C has no repeat
    a = next(g for g in table.groups if len(g.rows) == 3)
    assert sorted(r.name for r in a.rows) == ["sweeps/s1/0", "sweeps/s1/1", "sweeps/s1/2"]
    assert a.repeats == "seed=0, 1, 2"
    for metric, values in (("best_val", A_VAL), ("test", A_TEST), ("macro_f1", A_F1), ("ece", A_ECE)):
        s, x = a.spreads[metric], np.array(values)
        half = T_975[2] * x.std(ddof=1) / math.sqrt(3)
        assert s.n == 3 and s.mean == pytest.approx(x.mean()) and s.std == pytest.approx(x.std(ddof=1))
        assert (s.low, s.high) == (pytest.approx(x.mean() - half), pytest.approx(x.mean() + half))
    b = next(g for g in table.groups if len(g.rows) == 2)
    assert "train.lr=0.01" in b.label and set(b.spreads) == {"best_val"}  # B was never tested
    assert b.spreads["best_val"].high - b.spreads["best_val"].mean == pytest.approx(
        T_975[1] * np.std(B_VAL, ddof=1) / math.sqrt(2))
    assert next(r for r in table.rows if r.name == "train/c").group == ""
    text = format_table(table)
    assert "61.0 ± 10.5% (n=3)" in text  # A's val: mean 0.61, std 0.1054


def test_spread_of_one_run_has_no_std_and_equal_runs_a_zero_width_interval():
    one, same = spread([0.4]), spread([0.5, 0.5, 0.5])
    assert (one.n, one.std, one.low) == (1, None, None)
    assert same.std == 0 and same.low == same.high == pytest.approx(0.5)


def test_differing_keys_are_the_training_keys_that_differ(root):
    keys = build_table(root).keys
    assert keys == ["act.name", "train.lr", "seed"]  # config order; wandb.mode differs too but trains nothing


def test_sort_by_a_column_or_a_config_key(root):
    by_val = [r.name for r in build_table(root).rows]
    assert by_val[0] == "train/c" and by_val[-1] == "train/b0"  # best val first
    by_test = build_table(root, sort="test").rows
    assert [r.test for r in by_test[:3]] == sorted(A_TEST, reverse=True) and by_test[3].test is None
    by_lr = build_table(root, sort="train.lr").rows
    assert [r.name for r in by_lr[-2:]] == ["train/b0", "train/b1"]  # 0.01 after the default 0.001, ascending
    with pytest.raises(InatError, match=r"runs.sort=bogus is neither a column .* nor a config key"):
        build_table(root, sort="bogus")


def test_running_stopped_and_broken_runs_are_rows_with_a_reason(root):
    running = root / "train" / "running"
    write_metrics(running, [MetricsRow(1, 0.2)])
    stopped = root / "train" / "stopped"
    write_metrics(stopped, [MetricsRow(1, 0.2)])
    broken = root / "train" / "broken"
    broken.mkdir()
    (broken / SUMMARY).write_text('{"best_val_accuracy": 0.5,')  # cut off mid-write by a full disk
    bad_test = write_run(root / "train" / "bad_test", config(3), 0.5)
    (bad_test / "test.json").write_text("not json")
    shape = root / "train" / "shape"
    shape.mkdir()
    (shape / SUMMARY).write_text(json.dumps({"best_val_accuracy": "high"}))
    with acquire_run_lock(running):
        table = build_table(root)
        text = format_table(table)
    rows = {r.name: r for r in table.rows}
    assert rows["train/running"].status == "running" and "no summary.json yet" in rows["train/running"].reason
    assert rows["train/stopped"].status == "stopped" and "no live process" in rows["train/stopped"].reason
    assert rows["train/broken"].status == "broken" and "summary.json' is not valid JSON" in rows["train/broken"].reason
    assert rows["train/bad_test"].status == "broken" and "test.json" in rows["train/bad_test"].reason
    assert rows["train/shape"].status == "broken" and "not what a run writes" in rows["train/shape"].reason
    assert "running" in text and "broken" in text
    assert all(r.group == "" for r in rows.values() if r.status != "done")  # no config: no group
    assert next(g for g in table.groups if g.repeats == "seed=0, 1, 2").spreads["best_val"].n == 3


def test_compact_sweep_groups_by_its_overrides(tmp_path):
    sweep = tmp_path / "compact"
    records = []
    for seed, val in enumerate([0.4, 0.5]):
        run = write_run(tmp_path / "raw" / str(seed), config(seed), val)
        record = read_run(run)
        record.overrides = [f"seed={seed}", "train.lr=3e-4"]
        records.append(trial_row(seed, record, None))
    sweep.mkdir()
    write_trials_csv(sweep, records)
    table = build_table(sweep)
    assert [r.name for r in table.rows] == ["compact/1", "compact/0"]
    assert table.keys == ["seed"] and table.rows[0].config["train.lr"] == pytest.approx(3e-4)
    assert table.groups[0].spreads["best_val"].mean == pytest.approx(0.45)


def test_csv_holds_every_row_with_fractions(root, tmp_path):
    table = build_table(root)
    path = write_csv(table, tmp_path / "out" / "runs.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0])[:5] == ["run", "status", "act.name", "train.lr", "seed"]
    a0 = next(r for r in rows if r["run"] == "sweeps/s1/0")
    assert float(a0["best_val"]) == A_VAL[0] and float(a0["test"]) == A_TEST[0] and a0["group"] == "g1"
    assert a0["hardware"] == "CPU Test CPU (4 CPUs)" and a0["precision"] == "32" and a0["epochs"] == "3"


def test_report_shows_the_seed_groups(root):
    runs = [load_run(p, "s1") for p in sorted((root / "sweeps" / "s1").iterdir()) if p.is_dir()]
    html = repeats_section(runs + [load_run(root / "train" / "c")])
    assert "61.0 ± 10.5% (n=3)" in html and "s1/0, s1/1, s1/2" in html
    assert "No repeated configuration" in repeats_section(runs[:1])


def test_a_folder_of_another_command_is_not_a_run(root):
    other = root / "report" / "2026"
    (other / ".hydra").mkdir(parents=True)
    (other / HYDRA_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create({**BASE, "mode": {"name": "report"}})))
    assert "report/2026" not in [r.name for r in find_rows(root)]


def test_runs_mode_through_run_py(root, tmp_path):
    out = tmp_path / "table.csv"
    proc = run_cli(["+mode=runs", f"runs.root={root}", f"runs.out={out}", "runs.sort=test",
                    f"hydra.run.dir={tmp_path / 'cmd'}"])
    assert proc.returncode == 0, proc.stderr
    assert "6 runs, 2 seed groups" in proc.stdout and "g1 " in proc.stdout and out.is_file()
    bad = run_cli(["+mode=runs", f"runs.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'cmd2'}"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: runs.root") and "is not a folder" in lines[0]


@pytest.mark.slow
def test_a_hydra_multirun_over_seeds_is_one_group(tmp_path):
    """``python run.py -m seed=0,1`` (the way to repeat): its real trial folders form one seed group."""
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "seed=0,1", f"data.root={data}", "train.epochs=1", *FAST, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = build_table(sweep)
    assert [r.status for r in table.rows] == ["done", "done"] and table.keys == ["seed"]
    assert len(table.groups) == 1 and table.groups[0].spreads["best_val"].n == 2
    assert all(r.precision and r.hardware and r.epochs == 1 for r in table.rows)
