"""docs/explain.md quotes the Q4 model's explain.json; each quoted number is read back from that file."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "experiments" / "partA" / "figures"


def test_the_explain_page_quotes_its_own_explain_json():
    doc = (ROOT / "docs" / "explain.md").read_text()
    e = json.loads((FIGURES / "explain.json").read_text())
    conf = e["confusion"]
    per_class = conf["per_class_accuracy"]
    low, high = min(per_class, key=per_class.get), max(per_class, key=per_class.get)
    pairs = conf["confused_pairs"]
    worst = conf["worst_mistakes"][0]
    expected = [
        f"{low} is lowest at {100 * per_class[low]:.1f}% and {high} highest at {100 * per_class[high]:.1f}%",
        f"{pairs[0]['true']} → {pairs[0]['pred']}, {pairs[0]['count']} images or "
        f"{100 * pairs[0]['share_of_true']:.0f}%",
        f"{pairs[1]['true']} → {pairs[1]['pred']} ({pairs[1]['count']})",
        f"{pairs[2]['true']} →\n  {pairs[2]['pred']} ({pairs[2]['count']})",
        f"\"{worst['true']}\" called {worst['pred']} with {100 * worst['confidence']:.0f}% confidence",
        f"{100 * e['test_accuracy']:.1f}% test accuracy on {e['n']:,} images",
        f"in {e['seconds']:.0f} s (`explain.json#seconds`)",
    ]
    missing = [text for text in expected if text not in doc]
    assert missing == []
    for figure in e["figures"].values():  # every figure the page shows is the committed one
        assert (FIGURES / figure).is_file() and f"../experiments/partA/figures/{figure}" in doc


def test_the_q4_figures_are_from_the_tested_model():
    e = json.loads((FIGURES / "explain.json").read_text())
    result = json.loads((ROOT / "experiments" / "partA" / "result.json").read_text())
    assert e["test_accuracy"] == result["test_accuracy"] and e["n"] == result["test_n"]
