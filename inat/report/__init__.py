"""The report: one self-contained HTML file that answers the assignment's questions from data.

``python run.py +mode=report report.inputs=[RUN_OR_SWEEP,...] report.out=FILE`` reads run
folders and sweep folders, picks the best scratch run by validation accuracy, runs the
explain figures on its ``best.pt`` when its folder has none (this reads the test folder,
which the report is allowed to do on request; ``report.explain=false`` skips it), and
writes a single HTML page with every image inlined.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from inat.errors import InatError
from inat.report import charts
from inat.report.collect import best_run, collect
from inat.report.html import page
from inat.report.rejection import rejection_section
from inat.report.repeats import repeats_section
from inat.run_folder import EXPLAIN_FILE, GRADCAM
from inat.runs import atomic_open

__all__ = ["build_report"]


def _explain_best(run, work_dir: Path, allow: bool) -> tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """explain.json and its folder for ``run``: the run's own, else made now into ``work_dir``."""
    if run is None:
        return None, None
    if run.explain_dir is not None:
        return json.loads((run.explain_dir / EXPLAIN_FILE).read_text()), run.explain_dir
    if not allow or run.best_ckpt is None:
        return None, None
    from inat.explain import explain_checkpoint  # torch: only when a figure is missing

    target = Path(work_dir) / "explain" / run.name.replace("/", "_")
    return explain_checkpoint(run.best_ckpt, target), target


def _sweep_figures(sweeps) -> Dict[str, Dict[str, str]]:
    """Interactive plotly figures per sweep folder name, plotly.js inlined once (in the first)."""
    try:
        import plotly  # noqa: F401 - optional: without it the report shows the sweeps' PNGs
    except ImportError:
        return {}
    from inat.sweep.analysis import load_sweep  # Optuna, like plotly above
    from inat.sweep.plots import plotly_fragments

    out: Dict[str, Dict[str, str]] = {}
    for sweep in sweeps:
        data = load_sweep(sweep.path)
        if data.trained:
            out[sweep.path.name] = plotly_fragments(data, include_plotlyjs=not out)
    return out


def _gradcam_best_tuned(run, work_dir: Path, allow: bool) -> Optional[Path]:
    """Grad-CAM grid of the best fine-tuned run for Part B: the run's own, else drawn now into ``work_dir``."""
    if run is None:
        return None
    if run.explain_dir is not None and (run.explain_dir / GRADCAM).is_file():
        return run.explain_dir / GRADCAM
    if not allow or run.best_ckpt is None:
        return None
    from inat.explain import explain_checkpoint  # torch: only when a figure is missing

    target = Path(work_dir) / "explain" / run.name.replace("/", "_")
    explain_checkpoint(run.best_ckpt, target, what=["gradcam"])
    return target / GRADCAM


def build_report(inputs: List[str], out_file: Path, work_dir: Path, title: str = "inat report",
                 explain: bool = True) -> Dict[str, Any]:
    """Write the HTML report for ``inputs`` to ``out_file``; returns the key numbers it shows.

    ``work_dir`` receives explain figures made for the report (the inputs are only read).
    """
    # torch (sections, provenance, explain) and Optuna (sweep.analysis) load here, not at the top: this
    # __init__ runs before every module of inat.report
    from inat.report import sections
    from inat.report.provenance import run_provenance, this_machine

    out_file = Path(out_file)
    if out_file.is_dir():  # checked first: the explain figures below can take minutes
        raise InatError(f"report.out '{out_file}' is a directory; name the HTML file to write, e.g. "
                        f"report.out={out_file / 'report.html'}.")
    runs, sweeps, detections = collect(inputs)
    trained = [r for r in runs if r.trained]  # a trial the sweep budget refused has no result
    best = best_run(trained, scratch=True)
    explained, explain_dir = _explain_best(best, work_dir, explain)
    machine = this_machine()
    curves = charts.learning_curves(best.metrics, f"{best.name}: learning curves") if best else None
    tuned = [r for r in trained if not r.is_scratch]
    chart = None
    if tuned:
        shown = ([best] if best else []) + sorted(tuned, key=lambda r: -(r.val or -1))
        chart = charts.compare_runs([r.name for r in shown], [r.val for r in shown],
                                    [r.test_accuracy for r in shown], "Scratch vs fine-tuning")
    # The assignment's order: Part A Q1..Q4, Part B, Part C; then where each number came from,
    # and the long trial lists last, collapsed.
    body = [
        sections.counts_section(best),
        sections.sweep_plots_section(sweeps, _sweep_figures(sweeps)),
        sections.observations_section(sweeps),
        sections.best_model_section(best, explained, explain_dir, curves),
        rejection_section(trained),
        sections.finetune_section(trained, best, chart,
                                  _gradcam_best_tuned(best_run(trained, scratch=False), work_dir, explain)),
        repeats_section(trained),
        sections.part_c_section(detections),
        sections.provenance_section([run_provenance(r, machine) for r in trained], machine, sweeps),
        f"<p class=\"note\">Inputs: {', '.join(str(i) for i in inputs)}. Accuracies are percentages with one "
        f"decimal.</p>",
        sections.appendix(runs),
    ]
    with atomic_open(out_file, "w", encoding="utf-8") as fh:  # one sentence on a read-only or full disk
        fh.write(page(title, body))
    test = best.test_accuracy if best else None
    if test is None and explained:
        test = explained.get("test_accuracy")
    return {"out": str(out_file), "runs": len(trained), "sweeps": len(sweeps), "best_run": best.name if best else None,
            "best_val_accuracy": best.val if best else None, "test_accuracy": test,
            "explain_dir": str(explain_dir) if explain_dir else None}
