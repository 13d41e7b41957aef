"""``python run.py +mode=sweep_report sweep.dir=SWEEP_DIR``: plots, tables and observations.

Writes into SWEEP_DIR: ``sweep_progress.png``, ``sweep_parallel.png``, ``sweep_report.html``
(interactive plotly figures, plotly.js inline, so it opens offline), ``sweep_report.json``
(what the project report reads) and ``wandb_sweep.yaml`` (the same search space for wandb agents).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, Optional

from inat.errors import InatError
from inat.run_folder import SWEEP_REPORT, SWEEP_REPORT_HTML
from inat.runs import write_json
from inat.sweep.analysis import SweepData, best_row, correlations, load_sweep, reproduce_command
from inat.sweep.observations import observations
from inat.sweep.plots import plotly_fragments, save_pngs
from inat.sweep.wandb_export import preset_params, write_wandb_sweep


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}"


def _pct(value: Optional[float]) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def build_report(sweep_dir: Path, storage: Optional[str] = None, study_name: Optional[str] = None) -> Dict[str, Any]:
    """Compute and write every report file for ``sweep_dir``; returns the JSON summary."""
    sweep_dir = Path(sweep_dir)
    data = load_sweep(sweep_dir, storage, study_name)
    if not data.rows:
        raise InatError(f"'{sweep_dir}' holds no trial folders (0/, 1/, ...): pass a sweep folder "
                        "(hydra.sweep.dir of a `python run.py -m hydra/sweeper=optuna` command).")
    corr = correlations(data)
    obs = observations(data, corr)
    best = best_row(data)
    files = save_pngs(data, sweep_dir)
    write_wandb_sweep(data.info.get("params") or preset_params(), sweep_dir / "wandb_sweep.yaml")
    files["wandb_sweep"] = "wandb_sweep.yaml"
    files["html"] = SWEEP_REPORT_HTML
    counts = {s: sum(r.state == s for r in data.rows) for s in ("complete", "pruned", "budget", "running")}
    summary = {
        "sweep_dir": str(sweep_dir), "study_name": data.info.get("study_name"), "storage": data.info.get("storage"),
        "study_loaded": data.study is not None, "study_error": data.study_error, "trials": counts,
        "epochs_planned": data.epochs_planned, "files": files, "observations": obs, "correlations": corr,
        "best": None if best is None else {"trial": best.number, "val_accuracy": best.val_accuracy,
                                           "val_loss": best.val_loss, "params": best.params, "run_dir": best.path,
                                           "command": reproduce_command(data, best)},
        "table": [{"trial": r.number, "state": r.state, "val_accuracy": r.val_accuracy, "val_loss": r.val_loss,
                   "epochs": r.epochs, "train_seconds": r.train_seconds,
                   "started": r.started.isoformat() if r.started else None, "params": r.params} for r in data.rows],
    }
    (sweep_dir / SWEEP_REPORT_HTML).write_text(render_html(data, summary, plotly_fragments(data)))
    write_json(sweep_dir / SWEEP_REPORT, summary)
    return summary


def render_html(data: SweepData, summary: Dict[str, Any], figures: Dict[str, str]) -> str:
    """One self-contained page: figures, correlation table, best configuration, observations."""
    esc = html.escape
    corr_rows = "".join(
        f"<tr><td>{esc(c['param'])}</td><td>{esc(c['kind'])}</td><td>{c['n']}</td><td>{_fmt(c['val_accuracy'])}</td>"
        f"<td>{_fmt(c['val_loss'])}</td><td>{_num(c['importance'])}</td></tr>"
        for c in summary["correlations"])
    note = summary["correlations"][0].get("importance_note") if summary["correlations"] else None
    best = summary["best"]
    best_html = "<p>No finished trial.</p>"
    if best:
        params = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in best["params"].items())
        best_html = (f"<p>Trial {best['trial']}: val accuracy {100 * best['val_accuracy']:.1f}% "
                     f"(folder <code>{esc(best['run_dir'])}</code>)</p><table>{params}</table>"
                     f"<p>Reproduce:</p><pre>{esc(best['command'])}</pre>")
    obs = "".join(f"<li>{esc(o['text'])}<br><small>evidence: {esc(o['evidence'])}</small></li>"
                  for o in summary["observations"])
    trials = "".join(
        f"<tr><td>{t['trial']}</td><td>{t['state']}</td><td>{_pct(t['val_accuracy'])}</td>"
        f"<td>{t['epochs']}</td><td>{t['train_seconds']:.0f}</td><td>{esc(', '.join(f'{k}={v}' for k, v in t['params'].items()))}</td></tr>"
        for t in summary["table"])
    counts = ", ".join(f"{v} {k}" for k, v in summary["trials"].items() if v)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sweep {esc(data.sweep_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}pre{{background:#f4f4f4;padding:8px;white-space:pre-wrap}}</style></head><body>
<h1>Sweep {esc(data.sweep_dir.name)}</h1>
<p>{counts}; study <code>{esc(str(summary['study_name']))}</code> ({'loaded from storage' if data.study is not None else 'storage not loaded: ' + esc(str(data.study_error))}).</p>
<h2>1. Val accuracy by trial start, with the running best</h2>{figures['progress']}
<h2>2. Parallel coordinates</h2>{figures['parallel']}
<h2>3. Hyperparameters vs val accuracy and val loss</h2>
<p>Correlation over trained trials (best val accuracy per trial; val loss at that epoch). Two-level keys: Spearman with the
first level coded 0; numeric keys: Spearman; others: correlation ratio eta (0..1, no sign). Importance: fANOVA
(Optuna's <code>get_param_importances</code>) on complete trials, shares that sum to 1.{(' ' + esc(note)) if note else ''}</p>
<table><tr><th>hyperparameter</th><th>measure</th><th>trials</th><th>vs val accuracy</th><th>vs val loss</th><th>fANOVA importance</th></tr>{corr_rows}</table>
<h2>4. Best configuration</h2>{best_html}
<h2>5. Observations</h2><ul>{obs}</ul>
<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>best val acc (%)</th><th>epochs</th><th>train s</th><th>params</th></tr>{trials}</table>
</body></html>"""
