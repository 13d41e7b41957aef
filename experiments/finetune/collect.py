"""Collect outputs/finetune/<run>/{summary,test}.json into one JSON and a markdown table.

Usage: python experiments/finetune/collect.py outputs/finetune experiments/finetune/results.json
Trainable parameters are recounted by building the run's model and applying its strategy
at the first and last epoch (gradual unfreezes along the way).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from inat.models import build_from_config
from inat.models.freeze import on_epoch_start, setup_finetune, trainable_parameters


def _time_file(path: Path) -> dict:
    """CPU minutes and peak memory from ``/usr/bin/time -f "cpu_user_s=%U cpu_sys_s=%S wall_s=%e max_rss_kb=%M"``."""
    if not path.is_file():
        return {}
    values = dict(part.split("=") for part in path.read_text().split() if "=" in part)
    out = {"process_wall_minutes": round(float(values["wall_s"]) / 60, 2),
           "cpu_minutes": round((float(values["cpu_user_s"]) + float(values["cpu_sys_s"])) / 60, 2)}
    if "max_rss_kb" in values:
        out["peak_rss_mib"] = round(int(values["max_rss_kb"]) / 1024)
    return out


def main(runs: Path, out: Path) -> None:
    rows = []
    for run in sorted(p for p in runs.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((run / "summary.json").read_text())
        test_files = sorted(run.rglob("test.json"))
        test = json.loads(test_files[0].read_text()) if test_files else {}
        cfg = OmegaConf.create(summary["config"])
        model = build_from_config(cfg, len(summary["classes"]))
        setup_finetune(model, cfg.finetune)
        first = trainable_parameters(model)
        on_epoch_start(model, cfg.finetune, max(0, int(summary["epochs"]) - 1))
        rows.append({
            "run": run.name, "strategy": cfg.finetune.strategy, "k": cfg.finetune.k,
            "test_accuracy": test.get("accuracy"), "test_n": test.get("n"),
            "best_val_accuracy": summary["best_val_accuracy"], "epochs": summary["epochs"],
            "stop_reason": summary.get("stop_reason"), "trainable_params_first_epoch": first,
            "trainable_params_last_epoch": trainable_parameters(model), "total_params": summary["params"],
            "train_minutes": round(summary["train_seconds"] / 60, 2), "wall_minutes": round(summary["wall_seconds"] / 60, 2),
            "train_images_per_sec": summary["train_images_per_sec"], "input_size": model.spec.input_size,
            "cache_views": cfg.finetune.get("cache_views", 0), "cache_minutes": round(summary.get("cache_seconds", 0) / 60, 2),
            "precision": summary.get("precision"), "cpu": summary.get("environment", {}).get("cpu"),
            "cpu_capability": summary.get("environment", {}).get("cpu_capability"),
            **_time_file(run / "time.txt"),
        })
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| run | test acc | best val acc | epochs | trainable params (first -> last epoch) | train min | wall min "
          "| img/s | cache min | process wall min | CPU min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        print(f"| {r['run']} | {acc} | {r['best_val_accuracy']:.4f} | {r['epochs']} | "
              f"{r['trainable_params_first_epoch']:,} -> {r['trainable_params_last_epoch']:,} | {r['train_minutes']} | "
              f"{r['wall_minutes']} | {r['train_images_per_sec']} | {r['cache_minutes']} | "
              f"{r.get('process_wall_minutes', '-')} | {r.get('cpu_minutes', '-')} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
