"""GPU numbers for the README, in one short run on a lent GPU machine (see run.sh beside this file).

Measures steady-state training images/s of the scratch CNN at 96 and 224 px under fp16 and
bf16, EfficientNet-Lite0 partial fine-tuning (k=5) at 224 px, and the time of one 10k-image
epoch at 224 px once the uint8 cache is GPU-resident. Synthetic uint8 images stand in for
decoded photos: the step after the decode cache is what the GPU runs. Writes one JSON.

    python experiments/gpu/gpu_bench.py --out $OUT/gpu.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from inat.config import ActConfig, AugConfig, FiltersConfig, ModelConfig
from inat.data.augment import BatchAugment
from inat.inference import Precision, pick_device
from inat.models import create_model


def model(name: str, size: int):
    extra = {"arch": "tf_efficientnet_lite0", "input_size": size} if name != "scratch" else {}
    cfg = OmegaConf.structured(ModelConfig(name=name, **extra))
    return create_model(cfg, num_classes=10, image_size=size, act=OmegaConf.structured(ActConfig()),
                        filters=OmegaConf.structured(FiltersConfig()))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_sec(net, size: int, precision: str, batch: int, steps: int, device, n_images: int = 0) -> float:
    """Steady-state training throughput on a GPU-resident uint8 cache (augment + step)."""
    net = net.to(device).to(memory_format=torch.channels_last).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    policy = Precision(precision, "benchmark", device.type)
    scaler = policy.grad_scaler()
    n = n_images or batch * 8
    cache = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    aug = BatchAugment(OmegaConf.structured(AugConfig()), net.spec.mean, net.spec.std, 10)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(idx):
        x, y = aug(cache[idx], labels[idx], gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with policy.autocast():
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    order = torch.randperm(n, device=device)
    for i in range(5):  # warm-up: cuDNN autotuning
        step(order[(i * batch) % n:(i * batch) % n + batch])
    sync(device)
    t0 = time.perf_counter()
    done = 0
    for i in range(steps):
        start = (i * batch) % max(1, n - batch)
        step(order[start:start + batch])
        done += batch
    sync(device)
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--smoke", action="store_true", help="a few tiny steps on the CPU, to check the script runs")
    a = p.parse_args()
    device = pick_device()
    if a.smoke:
        device, a.steps = torch.device("cpu"), 2
    elif device.type != "cuda":
        raise SystemExit("error: this script measures a GPU and none is visible; use --smoke to check it on the CPU.")
    torch.backends.cudnn.benchmark = True
    cuda = device.type == "cuda"
    result = {"gpu": torch.cuda.get_device_name(device) if cuda else None,
              "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
              "torch": torch.__version__, "gpus": torch.cuda.device_count(), "smoke": a.smoke}
    sizes = ((96, 512), (224, 256)) if not a.smoke else ((32, 8),)
    for size, batch in sizes:
        for precision in ("16", "bf16"):
            result[f"scratch_{size}px_{precision}_img_s"] = round(
                images_per_sec(model("scratch", size), size, precision, batch, a.steps, device), 1)
    from inat.models.freeze import setup_finetune

    big = 224 if not a.smoke else 32
    lite = model("efficientnet_lite0", big)
    setup_finetune(lite, OmegaConf.create({"strategy": "partial", "k": 5, "every": 1, "lr_decay": 0.5,
                                           "bn": "freeze_frozen", "cached_features": True, "cache_views": 0}))
    result["lite0_partial_k5_224px_bf16_img_s"] = round(
        images_per_sec(lite, big, "bf16", 128 if not a.smoke else 4, max(1, a.steps // 2), device), 1)
    ips = images_per_sec(model("scratch", big), big, "bf16", 256 if not a.smoke else 8, 40 if not a.smoke else 2,
                         device, n_images=10_000 if not a.smoke else 64)
    result["scratch_224px_10k_epoch_s"] = round(10_000 / ips, 2)
    print(json.dumps(result, indent=1))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
