"""The report's repeats section: runs that differ only in their seed, as mean ± std (n) with a 95% interval.

The grouping and the numbers are :mod:`inat.runs_table`'s (the same as ``+mode=runs`` prints);
this file only lays them out as HTML.
"""
from __future__ import annotations

from typing import List

from inat.report.collect import Run
from inat.report.html import table
from inat.runs_table import GROUP_METRICS, format_spread, row_from_record, seed_groups


def repeats_section(runs: List[Run]) -> str:
    """Per seed group (configs equal but for ``seed``): best val, test accuracy, macro-F1 and ECE across its runs."""
    groups = seed_groups([row_from_record(r.record, r.name) for r in runs])
    out = ["<h2 id=\"repeats\">Repeats: the spread over seeds</h2>"]
    shown = [g for g in groups if g.spreads]
    if not shown:
        out.append("<p class=\"note\">No repeated configuration among the inputs: runs that differ only in "
                   "<code>seed</code> (<code>python run.py -m ... seed=0,1,2</code>) are shown here as mean ± std.</p>")
        return "".join(out)
    out.append("<p>Runs whose configurations differ only in <code>seed</code>: mean ± sample std (n finished runs) "
               "and the 95% Student-t interval of the mean, in brackets. A difference between two configurations "
               "smaller than their spread is a tie.</p>")
    rows = [[g.label, g.repeats, ", ".join(r.name for r in g.rows),
             *(format_spread(g.spreads[m]) if m in g.spreads else "–" for m in GROUP_METRICS)] for g in shown]
    out.append(table(["configuration", "repeats", "runs", *GROUP_METRICS.values()], rows))
    return "".join(out)
