"""The report's rejection section: how much of the test set a run keeps when it may say "unknown".

Drawn from each run's test.json ``rejection`` (``inat.holdout.rejection_section``): the
risk-coverage curve of the calibrated top-1 probability on the test set, and the coverage
and precision there at the threshold chosen on the validation split.
"""
from __future__ import annotations

from typing import List

from inat.report import charts
from inat.report.collect import Run
from inat.report.html import esc, figure, pct, table


def rejection_section(runs: List[Run]) -> str:
    """Per tested run with a ``rejection`` section: threshold, coverage and precision on val and test, and the curves."""
    tested = [(r, r.test["rejection"]) for r in runs if (r.test or {}).get("rejection")]
    out = ["<h2 id=\"rejection\">Saying \"unknown\": coverage at the rejection threshold</h2>"]
    if not tested:
        out.append("<p class=\"note\">No test.json with a rejection section among the inputs "
                   "(<code>python run.py +mode=test ckpt=PATH</code> writes one).</p>")
        return "".join(out)
    out.append("<p>An image whose calibrated top-1 probability is below the run's threshold is answered "
               "<code>unknown</code> (<code>predict.reject=true</code>). The threshold is the smallest that reaches "
               "<code>predict.target_precision</code> on the validation split; coverage is the share of images kept, "
               "precision the accuracy of the kept.</p>")
    rows = []
    for run, rej in tested:
        threshold = rej.get("threshold")
        rows.append([run.name, "none" if threshold is None else f"{threshold:.4f}", pct(rej.get("target_precision")),
                     pct(rej.get("val_coverage")), pct(rej.get("coverage")), pct(rej.get("precision")),
                     rej.get("curve", {}).get("aurc", "–")])
    out.append(table(["run", "threshold", "target precision", "val coverage", "test coverage", "test precision",
                      "AURC (test)"], rows, numeric=(1, 2, 3, 4, 5, 6)))
    for run, rej in tested:
        if rej.get("threshold") is None:
            out.append(f"<p class=\"note\">{esc(run.name)}: {esc(rej.get('note', 'no threshold'))}.</p>")
    curves = {run.name: rej["curve"] for run, rej in tested if rej.get("curve", {}).get("n")}
    marks = {run.name: (rej["coverage"], rej["precision"]) for run, rej in tested
             if rej.get("coverage") is not None and rej.get("precision") is not None}
    if curves:
        out.append(figure(charts.risk_coverage(curves, marks, "Risk-coverage on the test set"),
                          "Precision of the kept test images against the share kept, as the threshold on the "
                          "calibrated top-1 probability rises; the dot is the threshold chosen on validation."))
    return "".join(out)
