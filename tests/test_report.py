"""The HTML report from fake run and sweep folders, checked in headless Chromium."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from test_explain import CLASSES, REPO, make_checkpoint, make_dataset


def _write_run(path: Path, config: dict, overrides: list, val: float, test: float | None = None,
               epochs: int = 3) -> Path:
    """A run folder as the training loop writes it (summary, metrics, .hydra, optional test.json)."""
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (path / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    rows = [{"epoch": e + 1, "train_loss": 2.0 - 0.3 * e, "train_accuracy": val * (e + 1) / epochs,
             "val_loss": 2.1 - 0.3 * e, "val_accuracy": val * (e + 1) / epochs, "lr": 1e-3, "seconds": 10.0 * (e + 1)}
            for e in range(epochs)]
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"best_val_accuracy": val, "val_accuracy": val, "epochs": epochs, "train_images_per_sec": 123.4,
               "wall_seconds": 42.0, "params": 1234, "model": config["model"]["name"], "classes": CLASSES,
               "device": "cpu", "world_size": 1, "config": config}
    (path / "summary.json").write_text(json.dumps(summary))
    if test is not None:
        (path / "test").mkdir(exist_ok=True)
        (path / "test" / "test.json").write_text(json.dumps({
            "accuracy": test, "n": 12, "classes": CLASSES, "per_class_accuracy": {c: test for c in CLASSES},
            "confusion_matrix": [[4, 0, 0], [0, 4, 0], [0, 0, 4]], "ckpt": str(path / "checkpoints" / "best.pt")}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A scratch run with a checkpoint and test.json, a 2-trial sweep with plots, a fine-tuning run."""
    base = tmp_path_factory.mktemp("report")
    root = make_dataset(base / "data")
    ckpt = make_checkpoint(base / "runs" / "scratch_run" / "checkpoints" / "best.pt", root)
    config = __import__("torch").load(ckpt, weights_only=False)["config"]
    scratch = _write_run(base / "runs" / "scratch_run", config, [f"data.root={root}", "act=mish"], 0.61, 0.4734)

    sweep = base / "sweeps" / "2026-01-01_00-00-00"
    for i, (val, act) in enumerate([(0.40, "relu"), (0.55, "gelu")]):
        trial_cfg = json.loads(json.dumps(config))
        trial_cfg["act"]["name"] = act
        _write_run(sweep / str(i), trial_cfg, [f"act={act}", "filters.base=8"], val)
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": {
        "sweeper": {"params": {"act": "choice(relu,gelu,mish)", "filters.base": "choice(8,16)"}},
        "overrides": {"task": [f"data.root={root}"]}}})))
    rng = np.random.default_rng(0)
    for name in ("accuracy_vs_created.png", "parallel_coordinates.png", "correlation.png"):
        Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(sweep / name)
    (sweep / "sweep_report.json").write_text(json.dumps({  # the keys inat.sweep.report writes
        "files": {"progress": "accuracy_vs_created.png", "parallel": "parallel_coordinates.png",
                  "html": "sweep_report.html"},
        "observations": [{"text": "GELU beat ReLU by 15.0 points of validation accuracy.", "evidence": "2 trials"}],
        "correlations": [{"param": "act", "kind": "categorical", "n": 2, "val_accuracy": 0.5, "val_loss": None,
                          "importance": 0.7}],
        "best": {"trial": 1, "val_accuracy": 0.55, "params": {"act": "gelu"}, "command": "python run.py act=gelu"}}))

    tuned_cfg = json.loads(json.dumps(config))
    tuned_cfg["model"]["name"] = "resnet50"
    tuned_cfg["finetune"].update(strategy="partial", k=3)
    tuned = _write_run(base / "runs" / "tuned_run", tuned_cfg, ["model=resnet50", "finetune=partial", "finetune.k=3"],
                       0.88, 0.8612)
    return base, scratch, sweep, tuned


def test_report_sections_and_numbers(inputs, tmp_path):
    from inat.report import build_report

    base, scratch, sweep, tuned = inputs
    out = tmp_path / "report.html"
    result = build_report([str(scratch), str(sweep), str(tuned)], out, tmp_path / "work")
    text = out.read_text()
    assert result["best_run"] == "scratch_run" and result["runs"] == 4 and result["sweeps"] == 1
    assert result["test_accuracy"] == pytest.approx(0.4734)
    for needle in ("47.3%", "61.0%", "86.1%", "88.0%", "55.0%", "GELU beat ReLU", "choice(relu,gelu,mish)",
                   "(2 trials)", "python run.py act=gelu", "categorical",
                   "partial", "resnet50", "(3k^2 m + m)", "python run.py", "act=mish", "torch", "Provenance"):
        assert needle in text, needle
    assert "27.0 points above scratch" in text  # 88.0 - 61.0 on validation accuracy
    # Self-contained: every image inline, no external scripts, styles or fetches.
    srcs = re.findall(r'<img[^>]*src="([^"]{0,40})', text)
    # 6 explain figures + curves + comparison; the sweep's plots are interactive (plotly, inline).
    assert len(srcs) >= 6 + 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert text.count("Plotly.newPlot") == 2 and text.count("plotly.js v") == 1
    # plotly.js carries link strings (its logo, map credits) inside its code: not fetches.
    markup = re.sub(r"<script[^>]*>.*?</script>", "<script></script>", text, flags=re.S)
    assert not re.search(r'(src|href)="(https?:)?//', markup) and "<link" not in markup
    assert "<script src" not in text
    assert (tmp_path / "work" / "explain" / "scratch_run" / "explain.json").is_file()  # inputs only read
    assert not (scratch / "explain").exists()


def test_report_without_explain_and_bad_inputs(inputs, tmp_path):
    from inat.errors import InatError
    from inat.report import build_report

    base, scratch, sweep, tuned = inputs
    out = tmp_path / "r.html"
    result = build_report([str(sweep)], out, tmp_path, explain=False)
    assert result["best_run"].endswith("/1") and result["test_accuracy"] is None
    assert "No fine-tuning run" in out.read_text()
    with pytest.raises(InatError, match="not a folder"):
        build_report([str(tmp_path / "nope")], out, tmp_path)
    with pytest.raises(InatError, match="neither a run folder"):
        build_report([str(tmp_path)], out, tmp_path)
    with pytest.raises(InatError, match="empty"):
        build_report([], out, tmp_path)


def test_report_in_headless_chromium(inputs, tmp_path):
    """The command as typed, then the page in a real browser: all images load, key numbers visible."""
    from inat.report.browser import INSTALL_HINT, dump_dom, find_chromium, screenshot

    if find_chromium() is None:
        pytest.fail(f"Chromium is needed to check the report in a real browser: {INSTALL_HINT}.")
    base, scratch, sweep, tuned = inputs
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "run.py", "+mode=report", f"report.inputs=[{scratch},{sweep},{tuned}]",
                           f"report.out={out}", f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "test 47.3%" in proc.stdout
    dom = dump_dom(out)
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    assert total == out.read_text().count("<img ") and total >= 8
    assert dom.count("js-plotly-plot") >= 2  # plotly.js drew the interactive sweep figures offline
    assert f'data-images-loaded="{total}"' in dom and 'data-images-ok="true"' in dom
    assert re.search(r'id="test-accuracy"[^>]*>47\.3%<', dom)
    assert "86.1%" in dom and "GELU beat ReLU" in dom
    png = screenshot(out, tmp_path / "shot.png", width=900, height=700)
    with Image.open(png) as img:
        assert img.size == (900, 700)
        assert np.asarray(img.convert("L")).std() > 5  # not a blank page


def test_sweep_space_from_the_launch_file(tmp_path):
    """Without a sweep report or multirun.yaml, the searched space comes from the sweep's sweep.json."""
    from inat.report.collect import sweep_for_report

    _write_run(tmp_path / "0", {"model": {"name": "scratch"}, "act": {"name": "relu"}}, ["act=relu"], 0.3)
    (tmp_path / "sweep.json").write_text(json.dumps({"params": {"act": "choice(relu, gelu)"}}))
    sweep = sweep_for_report(tmp_path)
    assert sweep.space == {"act": "choice(relu, gelu)"} and [r.name for r in sweep.runs] == [f"{tmp_path.name}/0"]


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory):
    """A sweep of two trained scratch trials, the second recorded on a CUDA machine, then one the budget refused."""
    base = tmp_path_factory.mktemp("budget_sweep")
    sweep = base / "woof"
    config = {"model": {"name": "scratch"}, "act": {"name": "relu"}, "data": {"root": "/data"}, "seed": 0}
    for i, val in enumerate((0.30, 0.35)):
        _write_run(sweep / str(i), config, [f"train.lr={[0.001, 0.01][i]}", "act=relu"], val)
    record = json.loads((sweep / "1" / "summary.json").read_text())
    record["environment"] = {"python": "3.12.1", "torch": "2.14.1+cu130", "cpu": "Test EPYC", "cpu_count": 16,
                             "gpu": "NVIDIA H200"}
    (sweep / "1" / "summary.json").write_text(json.dumps(record))
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- train.lr=0.005\n- act=relu\n")
    (sweep / "2" / "summary.json").write_text(json.dumps({  # what sweeper._mark_budget writes
        "best_val_accuracy": 0.0, "val_accuracy": 0.0, "epochs": 0, "stop_reason": "budget: sweep budget of 1 "
        "minutes spent before this trial started"}))
    (sweep / "sweep.json").write_text(json.dumps({"params": {"train.lr": "tag(log, interval(0.0003, 0.01))"}}))
    return sweep


def test_budget_refused_trial_is_not_a_finetuned_run(budget_sweep, tmp_path):
    """A refused trial has no model name: it used to count as fine-tuning, '30.0 points below scratch'."""
    from inat.report import build_report

    out = tmp_path / "r.html"
    result = build_report([str(budget_sweep)], out, tmp_path, explain=False)
    text = out.read_text()
    assert result["runs"] == 2 and "No fine-tuning run" in text and "below scratch" not in text


def test_trial_count_excludes_the_refused_trial(budget_sweep, tmp_path):
    """The sweep header counts trained trials (468 in the docs), not folders (469)."""
    from inat.report import build_report

    out = tmp_path / "r.html"
    build_report([str(budget_sweep)], out, tmp_path, explain=False)
    text = out.read_text()
    assert "2 trained trials; 1 not trained (refused by the sweep budget)" in text and "3 trials" not in text


def test_report_answers_in_the_assignment_order(inputs, budget_sweep, tmp_path):
    """Q1 first, then Q2..Q4, Part B, Part C, provenance; the trial list only once, collapsed, at the end."""
    from inat.report import build_report

    base, scratch, sweep, tuned = inputs
    out = tmp_path / "r.html"
    build_report([str(scratch), str(sweep), str(tuned), str(budget_sweep)], out, tmp_path / "w", explain=False)
    text = out.read_text()
    order = [text.index(f'id="{key}"') for key in ("q1", "q2", "q3", "q4", "rejection", "part-b", "part-c",
                                                    "provenance", "all-runs")]
    assert order == sorted(order)
    assert text.index("<h1>") < order[0] < 2000  # the first screen answers Q1
    appendix = text[order[-1]:]
    assert text.count("woof/1<") == 1 and "woof/1<" in appendix  # each trial once, in the appendix
    # Provenance: one row per recorded environment of the sweep (trial 0 recorded none, trial 1 a GPU machine).
    assert text[order[7]:order[8]].count("sweep woof (1 trial)") == 2


def test_provenance_reads_the_runs_own_environment(budget_sweep, tmp_path):
    """fit records summary['environment']; provenance used to look for 'env'/'versions' and print the report machine's."""
    from inat.report.collect import load_run
    from inat.report.provenance import run_provenance

    machine = {"python": "9.9", "torch": "0.0-report", "cpu": "report cpu", "gpu": "none", "os": "x"}
    env = run_provenance(load_run(budget_sweep / "1", sweep="woof"), machine)["env"]
    assert env["torch"] == "2.14.1+cu130" and env["gpu"] == "NVIDIA H200" and "report machine" not in str(env)
    assert env["cpu"] == "Test EPYC (16 logical CPUs)"
    unrecorded = run_provenance(load_run(budget_sweep / "0", sweep="woof"), machine)["env"]
    assert unrecorded["torch"] == "0.0-report (report machine)"
    amx = shutil.copytree(budget_sweep / "1", tmp_path / "1")  # the fixture is shared: change a copy
    record = json.loads((amx / "summary.json").read_text())
    record["environment"].update(cpu_capability="AVX512", cpu_features=["avx2", "avx512f", "amx_bf16"])
    (amx / "summary.json").write_text(json.dumps(record))
    env = run_provenance(load_run(amx, sweep="woof"), machine)["env"]
    assert env["cpu"] == "Test EPYC (16 logical CPUs), torch kernels AVX512 (avx2 avx512f amx_bf16)"


@pytest.mark.parametrize("counts,config,expected", [
    ([100, 100, 98], {}, "balanced enough"),
    ([300, 100, 90], {}, "used neither a class-weighted loss"),
    ([300, 100, 90], {"train": {"class_weights": "auto"}}, "the run used class-weighted loss"),
    ([300, 100, 90], {"train": {"balanced_sampler": True}}, "the run used class-balanced sampling"),
])
def test_the_report_says_how_balanced_the_training_split_was(tmp_path, counts, config, expected):
    """summary.json has carried class_counts since class weighting existed; the report now reads them."""
    from inat.data.balance import imbalance
    from inat.report.collect import Run
    from inat.report.sections import quality_section
    from inat.run_folder import RunRecord, Summary

    labels = np.repeat(np.arange(len(counts)), counts)
    summary = Summary(stop_reason="epochs", **imbalance(labels, len(counts)))
    html = quality_section(Run(RunRecord(tmp_path, summary, config=config)))
    assert f"{min(counts):,} to {max(counts):,} images per class" in html and expected in html
