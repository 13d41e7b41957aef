"""Stratified, seeded train/validation split of ``train/`` and its manifest."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from inat.errors import InatError
from inat.runs import write_json


def build_split(labels: Sequence[int], val_fraction: float, seed: int,
                classes: Sequence[str] | None = None) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: each class gives round(n_c * val_fraction) images to val.

    Rounding per class keeps every class within one image of its exact share, and the
    permutation depends only on ``seed`` and the labels, so the split is reproducible.
    Degenerate data is refused: a single class (every score would be 100%), or a class
    whose only image would go to validation, leaving it nothing to train on.
    ``classes`` (names by label) only makes the messages name the class.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InatError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    labels = np.asarray(labels)
    present = np.unique(labels)

    def name(c: int) -> str:
        return f"'{classes[c]}'" if classes is not None and 0 <= c < len(classes) else f"number {c}"

    if len(present) < 2:
        only = name(int(present[0])) if len(present) else "none"
        raise InatError(f"train/ has a single class ({only}); a classifier needs at least 2 class folders, "
                        f"otherwise every accuracy is trivially 100%.")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)  # both sides need at least one image per class
        elif n_val >= 1:
            raise InatError(f"Class {name(int(c))} has a single image in train/, and data.val_fraction={val_fraction} "
                            f"would move it to validation, leaving no training image; add images or lower "
                            f"data.val_fraction below 0.5.")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def write_manifest(path: Path, root: Path, classes: Sequence[str], paths: Sequence[Path], labels: Sequence[int],
                   hashes: Sequence[str], train_idx: np.ndarray, val_idx: np.ndarray, seed: int,
                   val_fraction: float, given_val: bool = False) -> Dict:
    """Save which file went where (relative to ``root``), with content hashes for the leak guard.

    ``validation`` says whether the validation split is the dataset's own ``val/`` ("given") or
    was carved from train/ by ``split_seed`` and ``val_fraction`` ("carved").
    """
    def rows(idx: np.ndarray) -> List[Dict]:
        return [{"path": os.path.relpath(paths[i], root), "label": int(labels[i]), "sha1": hashes[i]} for i in idx]

    manifest = {"root": str(root), "classes": list(classes), "validation": "given" if given_val else "carved",
                "split_seed": seed, "val_fraction": val_fraction, "train": rows(train_idx), "val": rows(val_idx)}
    write_json(path, manifest)
    return manifest


def split_changes(saved: Dict[str, Sequence[str]], train_sha1: Sequence[str],
                  val_sha1: Sequence[str]) -> Dict[str, int]:
    """How a split (the SHA-1 of each train and val image) differs from a checkpoint's ``split_sha1``.

    Images are counted by content, so a renamed file is unchanged and an edited one is one
    removed plus one added. Returns ``added``, ``removed`` and ``moved`` (between train and
    val); all zero means the same images on the same sides.
    """
    before_train, before_val = Counter(saved.get("train", [])), Counter(saved.get("val", []))
    now_train, now_val = Counter(train_sha1), Counter(val_sha1)
    before, now = before_train + before_val, now_train + now_val
    return {"added": sum((now - before).values()), "removed": sum((before - now).values()),
            "moved": sum((before_train & now_val).values()) + sum((before_val & now_train).values())}
