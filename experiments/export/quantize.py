"""int8 export with the accuracy gate, measured on flowers5: the scratch CNN and EfficientNet-Lite0.

1. Train the scratch CNN (CPU defaults, fixed epochs, no time budget) and a Lite0 linear probe
   (cached features, 3 head epochs, 224 px) on flowers5, or reuse finished runs under
   outputs/quantize/.
2. ``+mode=export export.quantize=dynamic`` and ``=static`` for each, with ``export.max_drop=1``
   so that the record is kept whatever the drop (the gate's refusal is tested in
   tests/test_quantize.py); the drop against the default gate (0.01) is in the file as
   ``passes_default_gate``.
3. Writes experiments/export/quantize.json: per model and mode, validation accuracy fp32 / int8,
   the drop, both file sizes, batch-1 CPU latency of both, which ops run in int8, and the CPU
   model, capability, thread count, torch and onnxruntime versions that ``export.json`` records.
   Latency is read on a quiet machine only: nothing else should run beside this script.

    python experiments/export/quantize.py [--epochs 10]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers5"
DEFAULT_MAX_DROP = 0.01


def run(args: list[str]) -> None:
    cmd = [sys.executable, "run.py", *args]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def train(name: str, overrides: list[str], work: Path) -> Path:
    run_dir = work / name
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not (run_dir / "summary.json").is_file():
        run([*overrides, "train.max_minutes=0", f"data.root={FLOWERS}", "wandb.mode=disabled",
             f"hydra.run.dir={run_dir}"])
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="scratch CNN epochs (fixed, no time budget)")
    a = ap.parse_args()
    work = REPO / "outputs" / "quantize"
    models = {
        "scratch": train("scratch", [f"train.epochs={a.epochs}"], work),
        "efficientnet_lite0": train("lite0_probe", ["model=efficientnet_lite0", "finetune=linear_probe",
                                                    "train.epochs=3"], work),
    }
    out: dict = {"command": "python experiments/export/quantize.py" + (f" --epochs {a.epochs}" if a.epochs != 10 else ""),
                 "data": "flowers5", "scratch_epochs": a.epochs, "default_max_drop": DEFAULT_MAX_DROP,
                 "started": time.strftime("%Y-%m-%d %H:%M"), "results": []}
    for model, ckpt in models.items():
        for mode in ("dynamic", "static"):
            export_dir = work / f"export_{model}_{mode}"
            run(["+mode=export", f"ckpt={ckpt}", f"export.quantize={mode}", "export.max_drop=1",
                 f"hydra.run.dir={export_dir}"])
            record = json.loads((export_dir / "export.json").read_text())["quantize"]
            val = record["val"]
            out["results"].append({
                "model": model, "mode": mode, "val_n": val["n"], "fp32_accuracy": val["fp32_accuracy"],
                "int8_accuracy": val["int8_accuracy"], "drop": val["drop"],
                "passes_default_gate": val["drop"] <= DEFAULT_MAX_DROP,
                "fp32_bytes": record["bytes"]["fp32"], "int8_bytes": record["bytes"]["int8"],
                "fp32_latency_ms": record["latency_ms"]["fp32"], "int8_latency_ms": record["latency_ms"]["int8"],
                "int8_ops": record["ops"]["int8"], "float_ops": record["ops"]["float"],
                "machine": record["latency_machine"],
            })
            print(json.dumps(out["results"][-1]), flush=True)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M")
    (HERE / "quantize.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {HERE / 'quantize.json'}")


if __name__ == "__main__":
    main()
