"""``python run.py +mode=explain ckpt=PATH [explain.what=[...]]``: figures for a checkpoint into the output folder.

The data root is the checkpoint's own unless ``data.root`` is among the command's overrides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.explain import explain_checkpoint
from inat.modes import data_root_overridden


def run(cfg: Any, out_dir: Path) -> None:
    e = cfg.explain
    result = explain_checkpoint(cfg.ckpt, out_dir, what=list(e.what),
                                data_root=cfg.data.root if data_root_overridden() else None,
                                pick=e.pick, seed=e.seed, per_class=e.per_class,
                                neurons=list(e.neurons) if e.neurons else None, n_neurons=e.n_neurons,
                                image=e.image, batch_size=e.batch_size, cam_method=e.cam_method)
    acc = result.get("test_accuracy")
    line = f" (test accuracy {100 * acc:.1f}% on {result['n']} images)" if acc is not None else ""
    print(f"explain: {', '.join(result['figures'].values())} in {out_dir}{line}", flush=True)
