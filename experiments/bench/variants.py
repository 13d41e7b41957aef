"""Which step settings pay on the CPU at hand: steady-state training img/s of inat's own loop.

Each variant builds the real run (decode cache, augmentation, model, optimizer) in this
process and trains for ``--seconds`` after a warm-up (which also absorbs torch.compile's
compile time); variants alternate over ``--rounds`` so machine noise hits all alike. Records
the CPU model and torch's CPU capability with the numbers.

    python experiments/bench/variants.py --out experiments/bench/variants.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from inat.machine import cpu_features, cpu_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

# name -> overrides on top of the defaults (auto precision, channels_last, batch 64)
VARIANTS = {
    "defaults": [],
    "bf16": ["train.precision=bf16"],
    "fp32": ["train.precision=32"],
    "no_channels_last": ["train.channels_last=false"],
    "batch_128": ["train.batch_size=128"],
    "compile": ["train.compile=true"],
}


def measure(overrides: list, data: str, size: int, seconds: float, warmup: float, tmp: Path) -> float:
    from test_engine import compose  # the in-process composition the tests use

    from inat.training import setup
    from inat.training.build import loss_fn
    from inat.training.loop import Budget, train_one_epoch

    cfg = compose([f"data.root={data}", f"data.image_size={size}", "wandb.mode=disabled", "train.epochs=40",
                   *overrides])
    s = setup(cfg, tmp)
    s.model.train()
    criterion = loss_fn(s.recipe)
    train_one_epoch(s, 0, Budget(warmup, 10**6, s.device), criterion)
    s.state["train_seconds"] = 0.0
    row = train_one_epoch(s, 1, Budget(seconds, 10**6, s.device), criterion)
    return row["images_per_sec"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "imagewoof10"))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seconds", type=float, default=25)
    p.add_argument("--warmup", type=float, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--out", default=str(REPO / "experiments" / "bench" / "variants.json"))
    a = p.parse_args()
    import tempfile

    names = a.only or list(VARIANTS)
    results = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            warm = a.warmup * (6 if "compile" in n else 1)
            ips = measure(VARIANTS[n], a.data, a.size, a.seconds, warm, Path(tempfile.mkdtemp()))
            results[n].append(round(ips, 1))
            print(f"round {r + 1}  {n:<50} {ips:7.1f} img/s", flush=True)
    out = {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_features": cpu_features(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "size": a.size, "seconds": a.seconds,
           "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "images_per_sec": results,
           "median": {n: round(statistics.median(v), 1) for n, v in results.items()},
           "mean": {n: round(statistics.mean(v), 1) for n, v in results.items()},
           "std": {n: round(statistics.stdev(v), 1) if len(v) > 1 else 0.0 for n, v in results.items()},
           "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA") if k in os.environ}}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["median"], indent=1))


if __name__ == "__main__":
    main()
