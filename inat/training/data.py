"""The decoded training set and its split, built once per (dataset, size) and shared by the sources."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from inat.data.balance import balanced_permutation
from inat.data.cache import load_or_build
from inat.data.dataset import dataset_root, scan_train_set, scan_val_set
from inat.data.folder import FolderSplit
from inat.data.split import build_split
from inat.errors import InatError
from inat.models import ModelSpec
from inat.training import distributed

# Named, separate seeds (STYLE 6): the split has data.split_seed; these derive from `seed`.
SEED_INIT, SEED_ORDER, SEED_AUG, SEED_VIEWS = 0, 1, 2, 3


@dataclass
class TrainData:
    """Decoded images of train/ (and a given val/) and the split: ``images[train_idx]`` are trained on.

    With a given validation folder, ``folder`` lists train/'s files then val/'s, and the split
    is that order (``given_val`` True); otherwise the split is carved from train/.
    """

    root: Path
    folder: FolderSplit
    images: np.ndarray  # (N, S, S, 3) uint8 memory map
    labels: np.ndarray  # (N,) int64
    sha1: List[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    given_val: bool = False

    @property
    def classes(self) -> List[str]:
        return list(self.folder.classes)


def resolve_root(data_cfg: Any) -> Path:
    """The dataset root (a manifest's folder), downloading nature_12K on first use (once per node under torchrun)."""
    return Path(distributed.local_first(lambda: dataset_root(data_cfg)))


def load_data(data_cfg: Any, spec: ModelSpec, root: Path, folder: FolderSplit, progress: bool = True) -> TrainData:
    """Decode train/ once at the model's input size and split it, stratified and seeded.

    When the root has train/, val/ and test/ (or the manifest has split=val rows), that is the
    validation split as given (decoded into the same cache, after the training files) and
    nothing is carved from the training images.
    Under torchrun each node's local rank 0 builds the cache while the other ranks wait at
    a barrier, then they map the finished file; every rank then checks that it read the same
    images as rank 0.
    """
    n_train = len(folder)
    val = scan_val_set(data_cfg, root, folder.classes)
    given = val is not None
    label = "train/"
    if given:
        folder = FolderSplit(folder.root, folder.classes, folder.paths + val.paths, folder.labels + val.labels)
        label = "train/ + val/"
    cache = distributed.local_first(lambda: load_or_build(
        folder.paths, spec.input_size, interpolation=spec.interpolation, crop_pct=float(spec.crop_pct),
        directory=data_cfg.cache_dir, workers=int(data_cfg.workers), label=label, progress=progress))
    labels = np.asarray(folder.labels, dtype=np.int64)
    check_same_images(cache.sha1, labels)
    if given:
        train_idx, val_idx = np.arange(n_train), np.arange(n_train, len(folder))
    else:
        train_idx, val_idx = build_split(labels, float(data_cfg.val_fraction), int(data_cfg.split_seed),
                                         classes=folder.classes)
    return TrainData(root, folder, cache.images, labels, cache.sha1, train_idx, val_idx, given_val=given)


def checkpoint_split(state: Dict[str, Any], spec: ModelSpec, purpose: str, sides: Sequence[str] = ("val",),
                     progress: bool = False) -> TrainData:
    """The run's decoded train/ and its split, rebuilt from a checkpoint's config (never the test folder).

    The split is recomputed as training made it (stratified, seeded, or the given val/) and each
    of ``sides`` must hash to the images the checkpoint recorded there (``split_sha1``);
    otherwise InatError, whose sentence ends with ``purpose`` (what cannot be done on other images).
    """
    cfg = OmegaConf.create(state["config"])
    root = dataset_root(cfg.data, fetch=False)
    data = load_data(cfg.data, spec, root, scan_train_set(cfg.data, root), progress=progress)
    saved = state.get("split_sha1", {})
    for side in sides:
        idx = data.val_idx if side == "val" else data.train_idx
        expected = saved.get(side)
        if expected is not None and [data.sha1[i] for i in idx] != list(expected):
            name = "validation" if side == "val" else "training"
            where = cfg.data.get("manifest") or f"{root}/train"
            raise InatError(f"The {name} split rebuilt from '{where}' differs from the run's, so {purpose}; "
                            f"the training images changed since training.")
    return data


def images_fingerprint(sha1: List[str], labels: np.ndarray) -> Tuple[int, str]:
    """(number of images, hash of their SHA-1s and labels): equal on two ranks that read the same dataset."""
    digest = hashlib.sha256("\n".join(sha1).encode())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())  # the same files under other classes split otherwise
    return len(sha1), digest.hexdigest()


def check_same_images(sha1: List[str], labels: np.ndarray) -> None:
    """Refuse to train when ranks read different datasets (nodes with their own copy of data.root).

    Each rank derives the split and its share from its own scan; with one file more or less
    the ranks would run different numbers of steps and the next all-reduce would hang. One
    gather of (count, hash) per run, on every rank, so all of them stop; a no-op in one process.
    """
    seen = distributed.gather(images_fingerprint(sha1, labels))
    differ = [r for r, fingerprint in enumerate(seen) if fingerprint != seen[0]]
    if differ:
        counts = ", ".join(f"rank {r} {seen[r][0]}" for r in [0, *differ])
        raise InatError(f"The ranks read different datasets from data.root (images in train/: {counts}; the same count "
                        f"means other files or classes): give every node the same copy of the dataset.")


def epoch_order(data: TrainData, seed: int, epoch: int, batch_size: int, rank: int, world_size: int,
                balanced: bool = False):
    """This rank's share of the epoch's seeded permutation and its number of full batches.

    Equal shares keep DDP ranks in step; the ragged last batch is dropped (BatchNorm
    dislikes tiny batches), except that a share smaller than one batch is one batch. With
    ``balanced`` the epoch is drawn with replacement so every class is equally likely.
    """
    order = torch.Generator().manual_seed(seed * 1000 + SEED_ORDER + 7919 * epoch)
    if balanced:
        perm = data.train_idx[balanced_permutation(data.labels[data.train_idx], order)]
    else:
        perm = data.train_idx[torch.randperm(len(data.train_idx), generator=order).numpy()]
    per_rank = len(perm) // world_size
    perm = perm[rank * per_rank:(rank + 1) * per_rank]
    n_batches = len(perm) // batch_size if len(perm) >= batch_size else 1
    return perm, n_batches
