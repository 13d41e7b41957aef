"""Accuracy per minute: inat under 1-, 2.5- and 10-minute training budgets vs the peer's 10 minutes.

Same data, image size and width for both (imagewoof10, 96 px, 5 blocks of 32 filters, dense
128); the test folder is scored once per run. Each inat configuration runs for several seeds
(mean ± std); the peer (``shared/bench/peer_baseline.py``, the typical published solution)
runs for its own seeds. Rows are appended to ``--out`` after every run, so an interrupted
benchmark keeps what it measured and a rerun does only what is missing.

``--cpu-kind avx2`` restricts torch's and oneDNN's kernels on an AVX512 machine
(``ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2``), under which ``precision=auto`` trains in
fp32 as on a real AVX2 CPU; such rows are labelled emulated. Nothing else may run on the machine
meanwhile: the budgets are wall-clock training seconds.

Since ``train.resize_start=auto`` became the default, ``default`` trains with progressive
resizing from 64 px on the CPU (each row records the ``resize`` its summary reports) and
``fixed`` is the old fixed-size default; in files written before that change (their rows have
no ``resize``), ``default`` means fixed size and ``progressive`` is what ``default`` is now.

    python experiments/bench/time_to_accuracy.py --budgets 1 2.5 10 --seeds 0 1 2 \\
        --variants default progressive --peer-minutes 10 --out experiments/bench/time_to_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scipy import stats

from inat.machine import cpu_features, cpu_model

REPO = Path(__file__).resolve().parents[2]
CONFIDENCE = 0.95  # of the Welch interval of each variant's difference from the default
TARGET_10_MINUTES = 0.70  # test accuracy the 10-minute budget should reach
PEER = REPO.parent / "shared" / "bench" / "peer_baseline.py"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}

# inat configurations compared (each on top of the defaults of `make run`).
# progressive resizing: 64 px for the first 40% of the budget, up to 96 px by 80%, then 96 px
PROGRESSIVE = ["train.resize_start=64", "train.resize_hold=0.4", "train.resize_full=0.8"]
VARIANTS = {
    "default": [],  # train.resize_start=auto: the same as progressive on the CPU under a budget
    "fixed": ["train.resize_start=0"],  # the defaults before auto: 96 px throughout
    "progressive": PROGRESSIVE,
    # the same with the epoch cap lifted, so the time budget alone ends the run and sizes its schedule
    # (on a fast CPU the capped run stops at train.epochs before a 10-minute budget is spent)
    "progressive_uncapped": [*PROGRESSIVE, "train.epochs=100"],
    # a smaller first side, for the slowest CPUs: a 48-px step costs about a quarter of a 96-px one
    "progressive_48": ["train.resize_start=48", *PROGRESSIVE[1:]],
}
EPOCH_CAP = "train.epochs=40"  # every variant's cap unless it sets train.epochs itself


def run(cmd: list[str], env: dict, log: Path) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode
    if code != 0:
        raise SystemExit(f"{cmd[1]} exited {code}; its log: {log}\n" + log.read_text()[-2000:])


def inat_run(a, kind: str, variant: str, minutes: float, seed: int, work: Path) -> dict:
    run_dir = work / f"inat_{kind}_{variant}_{minutes}_{seed}"
    cmd = [sys.executable, "run.py", f"data.root={a.data}", f"data.image_size={a.size}", "filters.base=32",
           "model.dense_units=128", f"train.max_minutes={minutes}", f"seed={seed}",
           "wandb.mode=disabled", f"hydra.run.dir={run_dir}", *VARIANTS[variant]]
    if not any(o.startswith("train.epochs=") for o in VARIANTS[variant]):
        cmd.append(EPOCH_CAP)
    run(cmd, AVX2_ENV if kind == "avx2" else {}, work / f"{run_dir.name}.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    test = json.loads((run_dir / "test" / "test.json").read_text())
    env = summary["environment"]
    return {"tool": "inat", "cpu_kind": kind, "variant": variant, "minutes": minutes, "seed": seed,
            "test_accuracy": test["accuracy"], "macro_f1": test.get("macro_f1"), "test_n": test["n"],
            "epochs": summary["epochs"], "train_seconds": summary["train_seconds"],
            "images_per_sec": summary["train_images_per_sec"], "precision": summary.get("precision"),
            "resize": summary.get("resize"),
            "cpu": env.get("cpu"), "cpu_capability": env.get("cpu_capability"),
            "cpu_features": env.get("cpu_features"), "torch": env.get("torch"),
            "overrides": VARIANTS[variant], "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def peer_run(a, kind: str, minutes: float, seed: int, work: Path) -> dict:
    import torch

    out = work / f"peer_{kind}_{minutes}_{seed}.json"
    cmd = [sys.executable, str(PEER), a.data, "--size", str(a.size), "--budget-s", str(minutes * 60), "--seed",
           str(seed), "--out", str(out)]
    run(cmd, AVX2_ENV if kind == "avx2" else {}, work / f"{out.stem}.log")
    peer = json.loads(out.read_text())
    return {"tool": "peer", "cpu_kind": kind, "variant": "peer", "minutes": minutes, "seed": seed,
            "test_accuracy": peer["test_accuracy"], "epochs": peer["epochs"], "train_seconds": peer["train_seconds"],
            "images_per_sec": peer["train_images_per_sec"], "precision": "32", "cpu": cpu_model(),
            "cpu_capability": "AVX2" if kind == "avx2" else torch.backends.cpu.get_cpu_capability(),
            "cpu_features": cpu_features(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def key(row: dict) -> tuple:
    return row["tool"], row["cpu_kind"], row["variant"], float(row["minutes"]), int(row["seed"])


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std (n) of test accuracy and epochs per (CPU kind, tool, variant, budget)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["cpu_kind"], r["tool"], r["variant"], float(r["minutes"])), []).append(r)
    table = []
    for (kind, tool, variant, minutes), rs in sorted(groups.items()):
        accs = [r["test_accuracy"] for r in rs]
        table.append({"cpu_kind": kind, "tool": tool, "variant": variant, "minutes": minutes, "n": len(rs),
                      "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "epochs_mean": statistics.mean(r["epochs"] for r in rs),
                      "images_per_sec_mean": statistics.mean(r["images_per_sec"] for r in rs),
                      "cpu": rs[0]["cpu"], "cpu_capability": rs[0]["cpu_capability"],
                      "cpu_features": rs[0].get("cpu_features"), "precision": rs[0]["precision"],
                      "resize": rs[0].get("resize")})
    for t in table:  # each inat variant against the default at the same budget: Welch 95% interval, ties named
        base = groups.get((t["cpu_kind"], "inat", "default", t["minutes"]))
        mine = groups[(t["cpu_kind"], t["tool"], t["variant"], t["minutes"])]
        if t["tool"] == "inat" and t["variant"] != "default" and base and len(base) > 1 and len(mine) > 1:
            b, m = [r["test_accuracy"] for r in base], [r["test_accuracy"] for r in mine]
            ci = stats.ttest_ind(m, b, equal_var=False).confidence_interval(CONFIDENCE)
            t.update(diff=statistics.mean(m) - statistics.mean(b), diff_ci95=[float(ci.low), float(ci.high)],
                     tie=bool(ci.low <= 0 <= ci.high))
    return table


def targets(table: list[dict]) -> list[dict]:
    """Per CPU kind and inat variant: 1-minute mean vs the peer's 10-minute mean, and 10-minute mean vs 70%."""
    out = []
    peer10 = {t["cpu_kind"]: t["mean"] for t in table if t["tool"] == "peer" and t["minutes"] == 10}
    for t in table:
        if t["tool"] != "inat":
            continue
        if t["minutes"] == 1 and t["cpu_kind"] in peer10:
            out.append({"cpu_kind": t["cpu_kind"], "variant": t["variant"], "target": "1-min >= peer 10-min",
                        "inat": t["mean"], "peer": peer10[t["cpu_kind"]], "met": t["mean"] >= peer10[t["cpu_kind"]]})
        if t["minutes"] == 10:
            out.append({"cpu_kind": t["cpu_kind"], "variant": t["variant"], "target": f"10-min >= {TARGET_10_MINUTES:.0%}",
                        "inat": t["mean"], "met": t["mean"] >= TARGET_10_MINUTES})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "imagewoof10"))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--cpu-kind", choices=["native", "avx2"], default="native")
    p.add_argument("--budgets", type=float, nargs="+", default=[1, 2.5, 10], help="inat training minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--peer-minutes", type=float, default=10, help="0: no peer run")
    p.add_argument("--peer-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=str(REPO / "experiments" / "bench" / "time_to_accuracy.json"))
    p.add_argument("--summarise", action="store_true", help="only recompute the tables of --out from its runs")
    a = p.parse_args()
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    if a.summarise:
        result["table"] = summarise(result["runs"])
        result["targets"] = targets(result["table"])
        out.write_text(json.dumps(result, indent=1))
        return
    done = {key(r) for r in result["runs"]}
    work = Path(tempfile.mkdtemp(prefix="inat_tta_"))
    # inat's decode cache is paid once per dataset and size, not per run: build it before any budget.
    run([sys.executable, "run.py", f"data.root={a.data}", f"data.image_size={a.size}", "train.epochs=1",
         "train.max_minutes=0", "train.then_test=false", "wandb.mode=disabled", f"hydra.run.dir={work / 'warm'}"],
        {}, work / "warm.log")
    todo = [("inat", v, m, s) for s in a.seeds for m in a.budgets for v in a.variants]  # seeds outermost
    if a.peer_minutes:
        todo += [("peer", "peer", a.peer_minutes, s) for s in a.peer_seeds]
    for tool, variant, minutes, seed in todo:
        if (tool, a.cpu_kind, variant, float(minutes), seed) in done:
            continue
        row = (inat_run(a, a.cpu_kind, variant, minutes, seed, work) if tool == "inat"
               else peer_run(a, a.cpu_kind, minutes, seed, work))
        print(f"  {tool} {a.cpu_kind} {variant} {minutes} min seed {seed}: test {row['test_accuracy']:.1%}, "
              f"{row['epochs']} epochs, {row['images_per_sec']:.0f} img/s", flush=True)
        result["runs"].append(row)
        result["table"] = summarise(result["runs"])
        result["targets"] = targets(result["table"])
        result["data"], result["size"] = a.data.replace(str(REPO.parent), "<work>"), a.size
        result.setdefault("commands", [])
        command = " ".join(shlex.quote(c) for c in sys.argv)
        if command not in result["commands"]:
            result["commands"].append(command)
        out.write_text(json.dumps(result, indent=1))
    for t in result.get("table", []):
        print(f"{t['cpu_kind']:7s} {t['tool']:5s} {t['variant']:12s} {t['minutes']:>5} min: {t['mean']:.1%} ± "
              f"{t['std']:.1%} (n={t['n']}), {t['epochs_mean']:.1f} epochs")
    for t in result.get("targets", []):
        print(f"{t['cpu_kind']} {t['variant']}: {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['inat']:.1%})")


if __name__ == "__main__":
    main()
