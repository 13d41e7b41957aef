"""``python run.py +mode=lr_find [model=... finetune=... lr_find.rule=...]``: the LR range test's plot, JSON and command."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inat.lr_find import find_lr
from inat.modes import command_overrides


def run(cfg: Any, out_dir: Path) -> None:
    result = find_lr(cfg, out_dir, overrides=command_overrides())
    print(f"lr_find: suggested train.lr={result['suggestion']:.2g} ({result['rule']}: {result['rule_says']}); "
          f"{result['steps']} batches, {result['epoch_fraction']:.0%} of an epoch, {result['stop']}")
    print(f"wrote {Path(out_dir) / 'lr_find.png'} and {Path(out_dir) / 'lr_find.json'}")
    print(f"train with: {result['command']}")
