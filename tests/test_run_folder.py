"""The run-folder contract: the summary and metrics round-trip, and every reader agrees."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

from inat import run_folder
from inat.run_folder import MetricsRow, Summary


def full_summary() -> Summary:
    """A Summary with every field set, as fit writes it at its end."""
    return Summary(best_val_accuracy=0.5, val_accuracy=0.45, best_epoch=2, epochs=3, steps=30, stop_reason="epochs",
                   train_images_per_sec=321.5, first_epoch_images_per_sec=250.0, steady_images_per_sec=340.0,
                   train_seconds=12.5, wall_seconds=15.0, cache_seconds=1.25, params=1234,
                   trainable_params=1000, model="scratch", classes=["a", "b"], n_train=80, n_val=20, device="cpu",
                   world_size=1, environment={"python": "3.12.1", "torch": "2.14.1+cu130", "cpu": "Test CPU"},
                   config={"model": {"name": "scratch"}, "train": {"epochs": 3, "max_minutes": 0}},
                   precision="bf16", precision_reason="supported", input="cache", resize="64->96px",
                   resize_reason="train.resize_start=auto: ...", class_counts=[40, 40],
                   imbalance_ratio=1.0, imbalanced=False, temperature=1.3, temperature_note="T = 1.3 fitted",
                   reject_threshold=0.8, rejection={"target_precision": 0.95, "threshold": 0.8, "val_coverage": 0.7,
                                                    "val_precision": 0.96, "n_val": 20, "note": "chosen"})


def write_run(path: Path, summary: Summary, rows: list) -> Path:
    """A run folder: overrides, metrics.csv and summary.json through the run-folder writers."""
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    (path / run_folder.HYDRA_OVERRIDES).write_text("- act=relu\n- +train.lr=0.01\n")
    run_folder.write_metrics(path, rows)
    run_folder.write_summary(path, summary)
    return path


def test_summary_round_trip(tmp_path):
    """write_summary then read_run gives back the same Summary; every field is in the file."""
    s = full_summary()
    rows = [MetricsRow(1, 0.3, 1.9, 2.0, 0.25, 0.01, 100.0, 4.0), MetricsRow(2, 0.5, 1.5, 1.6, 0.4, 0.01, 101.0, 8.0)]
    run = write_run(tmp_path / "run", s, rows)
    on_disk = json.loads((run / run_folder.SUMMARY).read_text())
    assert set(on_disk) == {f.name for f in dataclasses.fields(Summary)} - {"extra"}
    record = run_folder.read_run(run)
    assert record.summary == s and record.metrics == rows and record.trained
    assert record.overrides == ["act=relu", "+train.lr=0.01"]
    assert run_folder.overrides_dict(record.overrides) == {"act": "relu", "train.lr": "0.01"}
    assert record.config == s.config


def test_unknown_keys_survive_and_precision_is_optional(tmp_path):
    """A key the type does not know is kept; a summary without precision omits the keys."""
    s = Summary.from_dict({"best_val_accuracy": 0.1, "future_key": [1, 2]})
    assert s.extra == {"future_key": [1, 2]} and s.to_dict()["future_key"] == [1, 2]
    assert "precision" not in Summary().to_dict()
    assert Summary.from_dict(s.to_dict()) == s


def test_budget_marker_and_compact_trials(tmp_path):
    """The budget marker is a Summary; a sweep read from trials.csv matches the one read from folders."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", full_summary(), [MetricsRow(1, 0.3, 1.9), MetricsRow(2, 0.5, 1.5)])
    marker = Summary(best_val_accuracy=0.0, val_accuracy=0.0, stop_reason="budget: sweep budget of 1 minutes spent")
    write_run(sweep / "1", marker, [])
    assert not run_folder.read_run(sweep / "1").trained and run_folder.read_run(sweep / "1").summary.budget_stopped
    raw = run_folder.read_sweep(sweep)
    assert list(raw.trials) == [0, 1] and not raw.compact
    start = dt.datetime(2026, 1, 1, 12, 0)
    compact_dir = tmp_path / "compact"
    compact_dir.mkdir()
    run_folder.write_trials_csv(compact_dir, [run_folder.trial_row(n, r, start) for n, r in raw.trials.items()])
    compact = run_folder.read_sweep(compact_dir)
    assert compact.compact and list(compact.trials) == [0, 1]
    a, b = raw.trials[0], compact.trials[0]
    assert [(m.epoch, m.val_accuracy, m.val_loss) for m in a.metrics] == [(m.epoch, m.val_accuracy, m.val_loss)
                                                                         for m in b.metrics]
    assert b.summary.best_val_accuracy == a.summary.best_val_accuracy and b.overrides == a.overrides
    assert b.summary.config_value("train.epochs") == 3 and b.started == start
    assert compact.trials[1].summary.budget_stopped


def test_sweep_readers_share_the_record(tmp_path):
    """The sweep analysis, pruning's reader and the report read the same trials from one reader."""
    from inat.report.collect import sweep_for_report as report_sweep
    from inat.sweep.analysis import load_sweep
    from inat.sweep.trials import read_trials

    sweep = tmp_path / "sweep"
    write_run(sweep / "0", full_summary(), [MetricsRow(1, 0.3, 1.9), MetricsRow(2, 0.5, 1.5)])
    write_run(sweep / "1", Summary(best_val_accuracy=0.0, stop_reason="budget: spent"), [])
    data = load_sweep(sweep)
    assert [r.state for r in data.rows] == ["complete", "budget"] and data.epochs_planned == 3
    assert [t.val_accuracy_at(2) for t in read_trials(sweep)] == [0.5, None]
    runs = report_sweep(sweep).runs
    assert [r.trained for r in runs] == [True, False] and runs[1].val is None
