"""Per-image cost of the frozen prefix and of a training step of the suffix, per cut k.

    python experiments/finetune/split_timing.py [--threads 2] [--size 224] [--out experiments/finetune/split_timing.json]

EfficientNet-Lite0 (offline ImageNet weights, 5-class head), batch 16, channels_last. For each
k: the prefix forward in bf16 (what finetune.cache_views runs once per view) and one
forward+backward of the suffix on cached outputs in bf16 and in fp32. Median of 3 timed
repeats after one warm-up; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from inat.config import ModelConfig
from inat.models import create_model
from inat.models.freeze import split_at

BATCH = 16


def per_image_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) / BATCH * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cuts", type=int, nargs="+", default=[5, 6, 7, 9])
    parser.add_argument("--out", type=Path)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    model = create_model(OmegaConf.structured(ModelConfig(name="efficientnet_lite0")), num_classes=5, image_size=ns.size)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, ns.size, ns.size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad(), bf16():
        result = {"threads": ns.threads, "size": ns.size, "batch": BATCH,
                  "full_forward_bf16_ms": per_image_ms(lambda: model(x)), "cuts": []}
    for k in ns.cuts:
        prefix, suffix = split_at(model, k)
        with torch.no_grad(), bf16():
            row = {"k": k, "prefix_forward_bf16_ms": per_image_ms(lambda: prefix(x))}
            cached = prefix(x).float()
        row["prefix_output_shape"] = list(cached.shape[1:])
        model.train()
        for name, ctx in (("bf16", bf16), ("fp32", lambda: torch.autocast("cpu", enabled=False))):
            def step():
                model.zero_grad(set_to_none=True)
                with ctx():
                    out = suffix(cached)
                out.float().sum().backward()
            row[f"suffix_train_step_{name}_ms"] = per_image_ms(step)
        model.eval()
        row["trainable_params"] = sum(p.numel() for p in suffix.parameters())
        result["cuts"].append(row)
        print(row, flush=True)
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
