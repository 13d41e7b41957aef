"""The README's results table against its evidence files, and the checker's own failure modes."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def claims_module():
    spec = importlib.util.spec_from_file_location("claims", REPO / "experiments" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["claims"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def tracked(under: str) -> list[str]:
    """Files git tracks under ``under`` ([] outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", under], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.split()


def test_every_readme_number_matches_its_file():
    """Each number of the results table equals the value its source names; none lacks a source."""
    claims = claims_module()
    problems = claims.check(REPO / "README.md")
    assert not problems, "\n".join(problems)
    found = claims.claims((REPO / "README.md").read_text())
    assert len(found) >= 40
    files = tracked("experiments")
    if files:  # a source must be committed evidence, not a file left on one machine
        missing = sorted({c.source.split("#")[0] for c in found} - set(files))
        assert not missing, f"README sources not tracked by git: {missing}"


def test_checker_fails_on_a_wrong_or_unsourced_number(tmp_path, monkeypatch):
    claims = claims_module()
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "r.json").write_text(json.dumps({"a": {"acc": 0.3499999940395355, "n": 1511},
                                                                 "rows": [{"name": "x y", "v": 2.74}]}))
    monkeypatch.setattr(claims, "REPO", tmp_path)
    head = "| result | number | command | source |\n|---|---|---|---|\n"
    good = head + "| r | **35.0%**; 1,511 MiB; 2.74x | c | experiments/r.json#a.acc; #a.n; #rows[name=x y].v |\n"
    (tmp_path / "README.md").write_text(good)
    assert claims.check(tmp_path / "README.md") == []
    for bad, why in ((good.replace("35.0%", "35.1%"), "holds"), (good.replace("2.74x", "2.74x, 7"), "no source"),
                     (good.replace("#a.n", "#a.missing"), "no key"),
                     (good.replace("experiments/r.json", "experiments/nope.json"), "not a file")):
        (tmp_path / "README.md").write_text(bad)
        problems = claims.check(tmp_path / "README.md")
        assert problems and why in problems[0], (why, problems)


def test_no_machine_paths_in_committed_evidence():
    """Committed results (JSON, CSV, YAML, Markdown under experiments/) name no machine's folders."""
    machine = re.compile(r"(?<![\w.])/(work|tmp|root|home|Users)/")
    offenders = [f for f in tracked("experiments") if f.endswith((".json", ".jsonl", ".csv", ".yaml", ".md"))
                 and machine.search((REPO / f).read_text(errors="replace"))]
    assert not offenders, offenders


def test_experiments_keeps_evidence_not_raw_output():
    files = tracked("experiments")
    if not files:
        pytest.skip("not a git checkout")
    assert len(files) < 200
    assert not [f for f in files if f.endswith(".db") or "/hydra.yaml" in f or re.search(r"/\d+/", f)]


def test_every_prose_number_of_the_checked_files_matches_its_file():
    """README prose (and every doc in PROSE_FILES): each measured number names its source and equals it."""
    claims = claims_module()
    for name in claims.PROSE_FILES:
        found = claims.prose_claims((REPO / name).read_text(), name)
        assert found, name
        problems = claims.verify(found)
        assert not problems, "\n".join(problems)
    assert "README.md" in claims.PROSE_FILES


def test_every_doc_is_checked():
    """No page under docs/ escapes the check: PROSE_FILES is the README and all of docs/*.md."""
    claims = claims_module()
    docs = sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))
    assert len(docs) >= 9 and set(docs) <= set(claims.PROSE_FILES)


def test_prose_checker_reads_blocks_sources_and_expressions(tmp_path, monkeypatch):
    claims = claims_module()
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "r.json").write_text(json.dumps({"s": 816.4, "acc": [0.444, 0.311], "n": 3927}))
    (tmp_path / "experiments" / "t.csv").write_text("run,acc\nfull,0.919\n")
    monkeypatch.setattr(claims, "REPO", tmp_path)
    good = ("# Title with 2 words\n\nIt took 816 s (13.6 min) on 3,927 images, run `x=0.5` twice.\n"
            "<!-- ev: experiments/r.json#s; #s / 60; #n -->\n\n"
            "- the peer scores 31.1%, -13.3 pts <!-- ev: experiments/r.json#acc[1]; #acc[1] - #acc[0] -->\n"
            "- full 91.9% <!-- ev: experiments/t.csv#[run=full].acc -->\n\n"
            "```\n$ python run.py   # 99.9% in a code block is not prose\n```\n")
    found = claims.prose_claims(good, "README.md")
    assert [c.text for c in found] == ["816 s", "13.6 min", "3,927 images", "31.1%", "-13.3 pts", "91.9%"]
    assert claims.verify(found) == []
    for bad, why in ((good.replace("13.6 min", "13.7 min"), "holds"), (good.replace("31.1%", "31.1%, 2.5x"), "no source"),
                     (good.replace("; #n -->", " -->"), "no source"), (good.replace("#acc[1] -", "#acc[7] -"), "index"),
                     (good.replace("t.csv", "u.csv"), "not a file")):
        problems = claims.verify(claims.prose_claims(bad, "README.md"))
        assert problems and any(why in p for p in problems), (why, problems)


def test_evidence_comments_do_not_break_table_headers():
    """A comment after a header row's last pipe would add a cell and stop the table rendering."""
    claims = claims_module()
    for name in claims.PROSE_FILES:
        lines = (REPO / name).read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if re.fullmatch(r"\|[-| :]+\|", lines[i + 1].strip()):
                assert line.rstrip().endswith("|"), f"{name}:{i + 1}: text after the header row's last '|'"


def test_selector_with_several_conditions_picks_one_row():
    claims = claims_module()
    table = [{"variant": "default", "minutes": 1.0, "mean": 0.40}, {"variant": "default", "minutes": 10, "mean": 0.68},
             {"variant": "progressive", "minutes": 10, "mean": 0.70}]
    assert claims.lookup({"table": table}, "table[variant=default,minutes=10].mean") == 0.68
    assert claims.lookup({"table": table}, "table[variant=progressive, minutes=10.0].mean") == 0.70
    with pytest.raises(KeyError, match="matches 2 items"):
        claims.lookup({"table": table}, "table[variant=default].mean")
    with pytest.raises(KeyError, match="matches 0 items"):
        claims.lookup({"table": table}, "table[variant=default,minutes=2.5].mean")


def test_selector_value_may_hold_commas():
    claims = claims_module()
    table = [{"variant": "scratch CNN (96 px, 5 x 32), 20 epochs", "seed": 0, "mean": 0.79},
             {"variant": "scratch CNN (96 px, 5 x 32), 20 epochs", "seed": 1, "mean": 0.78},
             {"variant": "Lite0 partial (k=5)", "seed": 0, "mean": 0.93}]
    assert claims.lookup({"t": table}, "t[variant=scratch CNN (96 px, 5 x 32), 20 epochs,seed=1].mean") == 0.78
    assert claims.lookup({"t": table}, "t[variant=Lite0 partial (k=5)].mean") == 0.93
    with pytest.raises(KeyError, match="matches 2 items"):
        claims.lookup({"t": table}, "t[variant=scratch CNN (96 px, 5 x 32), 20 epochs].mean")


def test_amx_label_needs_the_flag_in_every_file():
    """[Xeon AMX] needs amx_bf16 in cpu_features: torch's capability (AVX512) does not tell that CPU apart."""
    claims = claims_module()
    table = ("| result | number | command | source |\n|---|---|---|---|\n"
             "| **[Xeon AMX]** defaults, 1 minute | {n} | x | {src} |\n")
    amx = "experiments/bench/time_to_accuracy_xeon_amx.json"
    mean = json.loads((REPO / amx).read_text())
    mean = next(t["mean"] for t in mean["table"] if t["variant"] == "default" and t["minutes"] == 1)
    good = table.format(n=f"{mean:.1%}", src=f"{amx}#table[variant=default,minutes=1].mean")
    assert claims.label_problems(claims.claims(good)) == []
    epyc = "experiments/bench/time_to_accuracy_avx512.json"  # AVX512 too, but no AMX recorded
    mean = json.loads((REPO / epyc).read_text())
    mean = next(t["mean"] for t in mean["table"] if t["variant"] == "default" and t["minutes"] == 1)
    bad = table.format(n=f"{mean:.1%}", src=f"{epyc}#table[variant=default,minutes=1].mean")
    problems = claims.label_problems(claims.claims(bad))
    assert len(problems) == 1 and "amx_bf16" in problems[0]


def test_an_emulated_avx2_row_names_which_machine_was_restricted():
    """[Xeon AVX2 emulated] and [AVX2 emulated] both record capability AVX2; only the Xeon's files list amx_bf16."""
    claims = claims_module()
    table = ("| result | number | command | source |\n|---|---|---|---|\n"
             "| **[Xeon AVX2 emulated]** defaults, 1 minute | {n} | x | {src} |\n")
    for file, problems in (("experiments/bench/time_to_accuracy_xeon_avx2emu.json", 0),
                           ("experiments/bench/time_to_accuracy_avx2emu.json", 1)):  # the EPYC, restricted
        data = json.loads((REPO / file).read_text())
        mean = next(t["mean"] for t in data["table"] if t["variant"] == "default" and t["minutes"] == 1)
        row = table.format(n=f"{mean:.1%}", src=f"{file}#table[variant=default,minutes=1].mean")
        found = claims.label_problems(claims.claims(row))
        assert len(found) == problems and all("amx_bf16" in p for p in found)
