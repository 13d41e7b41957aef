"""Linear probe on cached features: the fast path the training loop is to get.

EfficientNet-Lite0 (offline ImageNet weights) computes its penultimate features once per
image (eval mode, no augmentation, ``features_and_head``), then only the new head trains on
them, which takes seconds per hundred epochs. The head of the epoch with the best validation
accuracy is scored once on the test folder. Uses the train/val split of a run folder (the
same images run.py trained and validated on).

Usage: python experiments/finetune/probe_features.py outputs/finetune/linear_probe/split.json \
           experiments/finetune/probe_features.json [SIZE]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from inat.config import ModelConfig
from inat.data.cache import load_or_build
from inat.data.folder import scan_test, test_access
from inat.data.images import to_float
from inat.models import create_model
from inat.models.freeze import features_and_head

SEED = 0


def features(backbone_fn, images: np.ndarray, spec, batch: int = 64) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, D) float32 penultimate features."""
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(images), batch):
            x = to_float(torch.from_numpy(np.array(images[start:start + batch])), spec.mean, spec.std)
            out.append(backbone_fn(x.contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)


def main(split_file: Path, out: Path, size: int | None) -> None:
    torch.set_num_threads(2)
    split = json.loads(split_file.read_text())
    root = Path(split["root"])
    classes = split["classes"]
    model = create_model(OmegaConf.structured(ModelConfig(name="efficientnet_lite0", input_size=size)),
                         num_classes=len(classes), image_size=size or 224)
    model.eval().to(memory_format=torch.channels_last)
    spec = model.spec
    backbone_fn, head = features_and_head(model)
    with test_access("experiments/finetune/probe_features.py"):
        test = scan_test(root, classes)
    sets = {"train": ([root / r["path"] for r in split["train"]], [r["label"] for r in split["train"]]),
            "val": ([root / r["path"] for r in split["val"]], [r["label"] for r in split["val"]]),
            "test": (list(test.paths), list(test.labels))}
    t0 = time.perf_counter()
    feats, labels = {}, {}
    for name, (paths, ys) in sets.items():
        cache = load_or_build(paths, spec.input_size, interpolation=spec.interpolation,
                              crop_pct=float(spec.crop_pct), label=name)
        feats[name] = features(backbone_fn, cache.images, spec)
        labels[name] = torch.tensor(ys)
    feature_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    torch.manual_seed(SEED)
    head.reset_parameters()
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs, bs = 100, 64
    best = (-1.0, 0, None)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        perm = torch.randperm(len(labels["train"]), generator=gen)
        for start in range(0, len(perm), bs):
            idx = perm[start:start + bs]
            loss = F.cross_entropy(head(feats["train"][idx]), labels["train"][idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = float((head(feats["val"]).argmax(1) == labels["val"]).float().mean())
        if val > best[0]:
            best = (val, epoch + 1, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[2])
    head_seconds = time.perf_counter() - t1
    with torch.no_grad():
        test_acc = float((head(feats["test"]).argmax(1) == labels["test"]).float().mean())
    result = {"model": spec.name, "input_size": spec.input_size, "test_accuracy": round(test_acc, 4),
              "test_n": len(labels["test"]), "best_val_accuracy": round(best[0], 4), "best_epoch": best[1],
              "head_epochs": epochs, "trainable_params": sum(p.numel() for p in head.parameters()),
              "feature_seconds": round(feature_seconds, 1), "head_train_seconds": round(head_seconds, 1),
              "seconds_per_head_epoch": round(head_seconds / epochs, 3)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
