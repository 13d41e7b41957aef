"""The report's sections, one function per question; each returns an HTML fragment."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from inat.models.scratch import (FORMULA_MACS, FORMULA_PARAMS, Architecture, architecture_from_config, count_macs,
                                 count_params)
from inat.report.collect import Run, Sweep
from inat.report.html import Raw, esc, figure, pct, table

# Explain figures in the order the report shows them, with what each answers.
EXPLAIN_FIGURES = [
    ("grid", "Test images, 3 per class: frame green = correct, red = wrong; bars = top-3 probabilities."),
    ("filters", "All first-layer filters (each scaled to its own range)."),
    ("feature_maps", "First-layer feature maps of one test image."),
    ("guided_backprop", "CONV5 neurons: the test image exciting each most, and the guided backprop of that neuron."),
    ("confusion", "Confusion matrix (rows = true class), per-class accuracy and the most confused pairs."),
    ("mistakes", "Worst mistakes: the most confident wrong predictions."),
    ("gradcam", "Grad-CAM: per test image, where the model looks for the predicted class and for the true class "
                "(correct left, wrong right)."),
]


def quality_section(run: Run) -> str:
    """Per-class recall and F1, macro-F1, top-k, and calibration (ECE before/after temperature
    scaling with the reliability diagram) from a run's test.json, when it has them."""
    test = run.test or {}
    out = [balance_line(run)]
    recall, f1 = test.get("per_class_recall"), test.get("per_class_f1") or {}
    if recall:
        out.append(table(["class", "recall", "F1"], [[c, pct(r), pct(f1.get(c))] for c, r in recall.items()],
                         numeric=(1, 2)))
    topk = test.get("top_k_accuracy") or {}
    if test.get("macro_f1") is not None:
        extra = ", ".join(f"{k} {pct(v)}" for k, v in topk.items())
        out.append(f"<p>Macro-F1 <b>{pct(test['macro_f1'])}</b>{'; ' + esc(extra) if extra else ''}.</p>")
    cal = test.get("calibration")
    if cal:
        before, after = cal.get("before") or {}, cal.get("after")
        line = f"ECE ({cal.get('bins')} bins) <b>{pct(before.get('ece'))}</b> with the raw softmax"
        if after:
            line += (f", <b>{pct(after['ece'])}</b> after temperature scaling (T = {cal['temperature']:.2f}, "
                     f"fitted on the {esc(cal.get('temperature_source', 'validation split'))}); "
                     f"NLL {before.get('nll', 0):.3f} &rarr; {after['nll']:.3f}, "
                     f"Brier {before.get('brier', 0):.3f} &rarr; {after['brier']:.3f}")
        out.append(f"<p>Calibration on the test set: {line}.</p>")
        diagram = run.path / "test" / str(cal.get("figure", "reliability.png"))
        if diagram.is_file():
            out.append(figure(diagram, "Reliability diagram: per-bin accuracy against confidence (diagonal = calibrated)."))
    return "".join(out)


def balance_line(run: Run) -> str:
    """The class balance of the run's training split (summary.json's ``class_counts``) and what the
    run did about it (``train.class_weights``, ``train.balanced_sampler``); empty for older runs."""
    counts, ratio = run.summary.class_counts, run.summary.imbalance_ratio
    if not counts:
        return ""
    train = run.config.get("train", {})
    used = [x for x, on in (("class-weighted loss", train.get("class_weights") == "auto"),
                            ("class-balanced sampling", train.get("balanced_sampler"))) if on]
    if run.summary.imbalanced:
        verdict = ("imbalanced; the run used " + " and ".join(used)) if used else (
            "imbalanced, and the run used neither a class-weighted loss (<code>train.class_weights=auto</code>) "
            "nor class-balanced sampling (<code>train.balanced_sampler=true</code>), so read macro-F1 beside accuracy")
    else:
        verdict = "balanced enough that accuracy and macro-F1 tell the same story"
    ratio_text = "a class has no images" if ratio in (None, float("inf")) else f"largest / smallest {ratio:.2f}"
    return (f"<p>Training split: {min(counts):,} to {max(counts):,} images per class ({esc(ratio_text)}): "
            f"{verdict}.</p>")


def _num(value: Any, digits: int = 0) -> str:
    if value is None or value == "":
        return "–"
    try:
        return f"{float(value):,.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def appendix(runs: List[Run]) -> str:
    """Every run given (sweep trials included), best validation accuracy first, collapsed.

    A sweep has hundreds of trials: listed in full before the answers they would push Q1
    thousands of pixels down the page, so they sit here, closed until asked for.
    """
    rows = []
    for r in sorted(runs, key=lambda r: -(r.val or -1)):
        rows.append([r.name, r.model if r.trained else "– (not trained)", r.get("act.name", "–"),
                     r.get("filters.organisation", "–"), r.get("finetune.strategy", "none"), pct(r.val),
                     pct(r.test_accuracy), r.summary.epochs, _num(r.summary.params), _num(r.summary.wall_seconds)])
    return (f"<h2>Appendix: all {len(runs)} runs and trials</h2><details id=\"all-runs\"><summary>Show the table "
            "(model selection uses validation accuracy, split from train/; test accuracy is reported, never used "
            "to choose)</summary>"
            + table(["run", "model", "act", "filters", "finetune", "best val", "test", "epochs", "params", "wall s"],
                    rows, numeric=(5, 6, 7, 8, 9)) + "</details>")


def counts_section(run: Optional[Run]) -> str:
    """Part A Q1: the closed-form parameter and multiply-add counts, and their values for the run."""
    out = ["<h2>Part A</h2><h2 id=\"q1\">Q1. The model and its closed-form counts</h2>",
           "<p>5 blocks of conv (k×k, m filters, 'same' padding) → activation → 2×2 max-pool, then a dense layer "
           "of n units and a 10-way output, on an H×W×3 input. Without batch norm and with m filters of k×k in every "
           "layer:</p>",
           table(["quantity", "closed form"], [["parameters", Raw(f"<code>{esc(FORMULA_PARAMS)}</code>")],
                                               ["multiply-adds (one image)", Raw(f"<code>{esc(FORMULA_MACS)}</code>")]])]
    if run is None:
        out.append("<p class=\"note\">No scratch run among the inputs: values not computed.</p>")
        return "".join(out)
    model = SimpleNamespace(**{"kernel_size": 3, "dense_units": 128, "batch_norm": True, **run.config.get("model", {})})
    filters = SimpleNamespace(**{"organisation": "same", "base": 32, "custom": None, **run.config.get("filters", {})})
    size = int(run.get("data.image_size", 96))
    classes = run.summary.classes or (run.test or {}).get("classes") or list(range(10))
    arch = architecture_from_config(model, num_classes=len(classes), image_size=size, filters=filters)
    m, n = int(filters.base), arch.dense_units
    k = arch.kernels[0]
    textbook = Architecture((m,) * 5, (k,) * 5, n, 10, size, size, False)
    rows = [["formula above with m, k, n, H, W of the run", f"m={m}, k={k}, n={n}, H=W={size}",
             _num(count_params(textbook)), _num(count_macs(textbook))],
            [f"the run as built ({filters.organisation} filters {list(arch.channels)}, kernels {list(arch.kernels)}, "
             f"batch norm {arch.batch_norm}, {len(classes)} classes)", "closed form (count_params, count_macs)",
             _num(count_params(arch)), _num(count_macs(arch))]]
    if run.summary.params is not None:
        rows.append(["the run as built", "measured: sum of numel() (summary.json)", _num(run.summary.params), "–"])
    if run.info:
        rows.append(["info.json", "", _num(run.info.get("params")), _num(run.info.get("macs"))])
    out.append(f"<p>Values for run <b>{esc(run.name)}</b>:</p>")
    out.append(table(["what", "how", "parameters", "multiply-adds"], rows, numeric=(2, 3)))
    return "".join(out)


def _plot_order(sweep: Sweep) -> List[Path]:
    """PNG files of a sweep: those named in sweep_report.json first (in its order), then the rest."""
    named: List[str] = []
    for key in ("files", "plots"):  # the sweep report names its figures under "files"
        plots = sweep.report.get(key)
        if isinstance(plots, dict):
            named += [str(v) for v in plots.values()]
        elif isinstance(plots, list):
            named += [str(p.get("file", p.get("path", "")) if isinstance(p, dict) else p) for p in plots]
    by_name = {p.name: p for p in sweep.pngs}
    ordered = [by_name[Path(n).name] for n in named if Path(n).name in by_name]
    return ordered + [p for p in sweep.pngs if p not in ordered]


def _trial_counts(sweep: Sweep) -> str:
    """"468 trained trials (313 stopped early by the median rule); 1 refused by the budget"."""
    trained = [r for r in sweep.runs if r.trained]
    pruned = sum(r.summary.pruned for r in trained)
    refused = sum(r.summary.budget_stopped for r in sweep.runs)
    text = f"{len(trained)} trained trials"
    if pruned:
        text += f" ({pruned} stopped early by the median rule)"
    if refused:
        text += f"; {refused} not trained (refused by the sweep budget)"
    return text


def sweep_plots_section(sweeps: List[Sweep], figures: Dict[str, Dict[str, str]]) -> str:
    """Part A Q2: per sweep, what was searched, accuracy by trial start, parallel coordinates, parameter effects.

    ``figures`` holds each sweep's interactive plotly fragments (by sweep folder name); a sweep
    without them shows the PNGs its sweep report left in the folder.
    """
    out = ["<h2 id=\"q2\">Q2. Hyperparameter sweeps</h2>"]
    if not sweeps:
        out.append("<p class=\"note\">No sweep folder among the inputs.</p>")
        return "".join(out)
    for sweep in sweeps:
        out.append(f"<h3>Sweep {esc(sweep.path.name)}: {esc(_trial_counts(sweep))}</h3>")
        if sweep.command:
            out.append(f"<p>Command: <code>{esc(sweep.command)}</code></p>")
        if sweep.space:
            out.append("<details><summary>Searched space</summary>" + table(
                ["parameter", "values / distribution"], [[k, v] for k, v in sweep.space.items()]) + "</details>")
        interactive = figures.get(sweep.path.name)
        if interactive:
            out.append("<p>Accuracy by trial start (pauses between sittings cut out and marked):</p>"
                       + interactive["progress"])
            out.append("<p>Parallel coordinates (log axes for log-sampled parameters; drag on an axis to "
                       "filter):</p>" + interactive["parallel"])
        else:
            for png in _plot_order(sweep):
                out.append(figure(png, f"{sweep.path.name}/{png.name}"))
        corr = sweep.report.get("correlations") or []
        if corr and isinstance(corr[0], dict):
            keys = [k for k in ("param", "kind", "n", "val_accuracy", "val_loss", "importance") if k in corr[0]]
            out.append("<p>Parameter effects: rank correlation with best val accuracy and val loss, and "
                       "fANOVA importance (sweep report):</p>" + table(
                keys, [[_num(c.get(k), 3) if isinstance(c.get(k), float) else c.get(k, "") for k in keys] for c in corr]))
            note = corr[0].get("importance_note")
            if note:
                out.append(f"<p class=\"note\">Importance: {esc(note)}</p>")
        best = sweep.report.get("best_config") or sweep.report.get("best")
        if isinstance(best, dict) and best.get("command"):
            out.append(f"<p>Best trial{' ' + esc(best['trial']) if best.get('trial') is not None else ''}: "
                       f"<code>{esc(best['command'])}</code>"
                       + (f" (val {pct(best['val_accuracy'])})" if best.get("val_accuracy") is not None else "")
                       + "</p>")
        top = sorted((r for r in sweep.runs if r.val is not None), key=lambda r: -r.val)[:10]
        if top:
            # Overrides every trial shares (data root, budget, ...) are shown once, so the table
            # shows what the sweep varied.
            common = set.intersection(*(set(r.overrides) for r in sweep.runs)) if sweep.runs else set()
            if common:
                out.append("<p>Overrides common to all trials: <code>"
                           + esc(" ".join(o for o in sweep.runs[0].overrides if o in common)) + "</code></p>")
            out.append("<p>Top trials by validation accuracy:</p>" + table(
                ["trial", "overrides (sampled)", "best val", "epochs"],
                [[r.path.name, " ".join(o for o in r.overrides if o not in common), pct(r.val), r.summary.epochs]
                 for r in top], numeric=(2, 3)))
    return "".join(out)


def observations_section(sweeps: List[Sweep]) -> str:
    """Part A Q3: what the sweeps show, each observation with the numbers behind it."""
    out = ["<h2 id=\"q3\">Q3. Observations from the sweeps</h2>"]
    items = []
    for sweep in sweeps:
        for o in sweep.report.get("observations") or []:
            if isinstance(o, dict):
                evidence = f" <span class=\"note\">(evidence: {esc(o['evidence'])})</span>" if o.get("evidence") else ""
                items.append(f"<li><b>{esc(sweep.path.name)}</b>: {esc(o.get('text', o))}{evidence}</li>")
            else:
                items.append(f"<li><b>{esc(sweep.path.name)}</b>: {esc(o)}</li>")
    if not items:
        out.append("<p class=\"note\">No sweep report among the inputs (python run.py +mode=sweep_report "
                   "sweep.dir=SWEEP_DIR writes one).</p>")
    else:
        out.append(f"<ul>{''.join(items)}</ul>")
    return "".join(out)


def best_model_section(run: Optional[Run], explained: Optional[Dict[str, Any]], explain_dir: Optional[Path],
                       curves: Optional[bytes]) -> str:
    """Part A Q4: the best run's test accuracy and its explanation figures."""
    out = ["<h2 id=\"q4\">Q4. Best model on the test set</h2>"]
    if run is None:
        out.append("<p class=\"note\">No finished scratch run among the inputs.</p>")
        return "".join(out)
    test = run.test_accuracy
    source = "test.json of the run (+mode=test)"
    if test is None and explained and explained.get("test_accuracy") is not None:
        test, source = explained["test_accuracy"], "scored by explain for this report"
    n = (run.test or {}).get("n") or (explained or {}).get("n")
    out.append(f"<p>Best run by validation accuracy: <b>{esc(run.name)}</b> (best val {pct(run.val)}).</p>")
    out.append(f"<p>Test accuracy: <span class=\"key\" id=\"test-accuracy\">{pct(test)}</span> "
               f"on {esc(n or '?')} test images <span class=\"note\">({esc(source)})</span></p>")
    per_class = (run.test or {}).get("per_class_accuracy") or ((explained or {}).get("confusion") or {}).get("per_class_accuracy")
    if (run.test or {}).get("per_class_recall"):
        out.append(quality_section(run))
    elif per_class:
        out.append(table(["class", "test accuracy"], [[c, pct(a)] for c, a in per_class.items()], numeric=(1,)))
    if curves:
        out.append(figure(curves, f"Learning curves of {run.name} (metrics.csv)"))
    if explained and explain_dir is not None:
        for key, caption in EXPLAIN_FIGURES:
            name = explained.get("figures", {}).get(key)
            if name and (explain_dir / name).is_file():
                out.append(f"<h3>{esc(key.replace('_', ' '))}</h3>" + figure(explain_dir / name, caption))
        pairs = (explained.get("confusion") or {}).get("confused_pairs") or []
        if pairs:
            out.append("<p>Most confused pairs:</p>" + table(
                ["true", "predicted as", "images", "share of the true class"],
                [[p["true"], p["pred"], p["count"], pct(p["share_of_true"])] for p in pairs], numeric=(2, 3)))
    else:
        out.append("<p class=\"note\">No explanation figures (report.explain=false or no best.pt).</p>")
    return "".join(out)


def finetune_section(runs: List[Run], scratch_best: Optional[Run], chart: Optional[bytes],
                     gradcam: Optional[Path] = None) -> str:
    """Part B: fine-tuning strategies, and scratch against the best fine-tuned run."""
    tuned = [r for r in runs if r.trained and not r.is_scratch]  # a budget-refused trial has no model
    out = ["<h2 id=\"part-b\">Part B. Fine-tuning a pretrained model</h2>"]
    if not tuned:
        out.append("<p class=\"note\">No fine-tuning run (model.name other than scratch) among the inputs.</p>")
        return "".join(out)
    rows = []
    for r in sorted(tuned, key=lambda r: -(r.val or -1)):
        strategy = r.get("finetune.strategy", "none")
        k = r.get("finetune.k") if strategy == "partial" else ""
        views = r.get("finetune.cache_views", 0) if strategy == "partial" else 0
        if views:  # trained on cached frozen-prefix outputs of this many augmented views
            k = f"{k} (cached, {views} views)"
        rows.append([r.name, r.model, strategy, k, pct(r.val), pct(r.test_accuracy), r.summary.epochs,
                     _num(r.summary.wall_seconds), _num(r.summary.train_images_per_sec)])
    out.append("<p>Strategies (config <code>finetune.strategy</code>):</p>")
    out.append(table(["run", "model", "strategy", "k", "best val", "test", "epochs", "wall s", "train img/s"], rows,
                     numeric=(4, 5, 6, 7, 8)))
    best_tuned = max((r for r in tuned if r.val is not None), key=lambda r: r.val, default=None)
    if best_tuned is not None and scratch_best is not None:
        rows = [[f"scratch ({scratch_best.name})", pct(scratch_best.val), pct(scratch_best.test_accuracy),
                 _num(scratch_best.summary.params), _num(scratch_best.summary.wall_seconds)],
                [f"fine-tuned {best_tuned.model}, {best_tuned.get('finetune.strategy')} ({best_tuned.name})",
                 pct(best_tuned.val), pct(best_tuned.test_accuracy), _num(best_tuned.summary.params),
                 _num(best_tuned.summary.wall_seconds)]]
        out.append("<p>Scratch against fine-tuning (best of each by validation accuracy):</p>")
        roots = {scratch_best.dataset, best_tuned.dataset}
        if len(roots) > 1:  # a cross-dataset gap says nothing about fine-tuning
            out.append(f"<p class=\"note\"><b>Not comparable:</b> the two runs used different datasets "
                       f"({esc(', '.join(sorted(roots)))}).</p>")
        out.append(table(["model", "best val", "test", "params", "wall s"], rows, numeric=(1, 2, 3, 4)))
        if best_tuned.val is not None and scratch_best.val is not None:
            gap = 100 * (best_tuned.val - scratch_best.val)
            out.append(f"<p>Fine-tuning is {abs(gap):.1f} points {'above' if gap >= 0 else 'below'} scratch "
                       f"on validation accuracy.</p>")
    if chart:
        out.append(figure(chart, "Best validation and test accuracy per run"))
    if best_tuned is not None and best_tuned.test:
        out.append(f"<h3>Best fine-tuned run on the test set ({esc(best_tuned.name)})</h3>" + quality_section(best_tuned))
    if gradcam is not None and gradcam.is_file():
        out.append("<h3>gradcam</h3>" + figure(gradcam, f"Grad-CAM of the best fine-tuned run: {EXPLAIN_FIGURES[-1][1]}"))
    return "".join(out)


def part_c_section(detections: List[Dict[str, Any]]) -> str:
    """Part C: the detection application, from the detect.json each detect run wrote."""
    out = ["<h2 id=\"part-c\">Part C. Detection application</h2>"]
    if not detections:
        out.append("<p class=\"note\">No detection folder among the inputs "
                   "(python run.py +mode=detect detect.inputs=[...] writes one).</p>")
        return "".join(out)
    for d in detections:
        summary = d["summary"]
        rows = [[k, v] for k, v in (summary.get("detections_per_class") or {}).items()]
        out.append(f"<h3>{esc(d['name'])}</h3><p>{esc(summary.get('frames', '?'))} frames; "
                   f"{len(summary.get('loitering_alerts') or [])} loitering alerts"
                   + (f"; {_num(summary.get('frames_per_sec'), 2)} frames/s" if summary.get("frames_per_sec") else "")
                   + "</p>")
        if rows:
            out.append(table(["class", "detections"], rows, numeric=(1,)))
    return "".join(out)


def provenance_section(rows: List[Dict[str, Any]], machine: Dict[str, str], sweeps: List[Sweep]) -> str:
    """Which command, data root, seeds, versions and hardware produced each number, from each run's record.

    A sweep's trials share one command: it gets one row per distinct recorded environment
    rather than one per trial (the trials are in the appendix).
    """
    def versions(env: Dict[str, str]) -> str:
        return f"python {env['python']}, torch {env['torch']}" + (f", {env['precision']}" if env.get("precision") else "")

    def hardware(env: Dict[str, str]) -> str:
        return f"{env.get('device', '?')}; CPU {env['cpu']}; GPU {env['gpu']}"

    body = []
    by_sweep: Dict[str, Dict[tuple, int]] = {}
    for p in rows:
        env = p["env"]
        if p.get("sweep"):
            key = (versions(env), hardware(env), p["data_root"])
            by_sweep.setdefault(p["sweep"], {}).setdefault(key, 0)
            by_sweep[p["sweep"]][key] += 1
            continue
        seeds = ", ".join(f"{k}={v}" for k, v in p["seeds"].items())
        body.append([p["run"], Raw(f"<code>{esc(p['command'])}</code>"), p["data_root"], seeds, versions(env),
                     hardware(env)])
    for s in sweeps:
        for (ver, hw, root), n in by_sweep.get(s.path.name, {}).items():
            body.append([f"sweep {s.path.name} ({n} trial{'' if n == 1 else 's'})", Raw(f"<code>{esc(s.command or '?')}</code>"), root,
                         "per trial (appendix)", ver, hw])
    return "".join(["<h2 id=\"provenance\">Provenance</h2>",
                    "<p>Every number above comes from the run folders listed here; versions and hardware are what "
                    "each run recorded in its own summary.json. Values marked \"(report machine)\" were not recorded "
                    "by the run and are those of the machine that built this report.</p>",
                    table(["run", "command", "data root", "seeds", "versions", "hardware"], body),
                    "<p>Report machine: " + esc(", ".join(f"{k} {v}" for k, v in machine.items())) + "</p>"])
