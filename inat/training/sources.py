"""The three things a training step can read, behind one interface.

- :class:`ImageSource`: augmented uint8 images from the decode cache (every strategy);
- :class:`FeatureSource`: the linear probe's backbone features, computed once;
- :class:`PrefixViewSource`: partial fine-tuning's frozen-prefix outputs on V cached views.

Each has ``module`` (what the optimizer step runs forward on: the model, its head or its
unfrozen suffix), ``batches(perm, batch_size, n_batches, seed, start=0, draws=None)`` yielding
``(inputs, targets)`` on the device, ``draws(seed)`` (the epoch's random draws, see
:class:`Draws`) and ``evaluate(model)`` returning validation ``(loss, accuracy)`` as device
tensors, so the loop reads them once per epoch. ``start`` skips the batches a run stopped
mid-epoch has done, without gathering or augmenting them; with the saved ``draws`` the rest of
the epoch is the one the uninterrupted run would have drawn.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from inat.data.augment import BatchAugment
from inat.errors import InatError
from inat.inference import Normalizer, Precision, batched_logits, eval_mode, forward_batches, to_device_batch
from inat.models import InatModel, ModelSpec
from inat.models.freeze import features_and_head, split_at
from inat.training.data import SEED_VIEWS, TrainData

Batch = Tuple[torch.Tensor, torch.Tensor]

# The prefetch path: host buffers reused round-robin and the threads filling them. Two workers
# keep up with a step that is faster than one memory-map gather; a third buffer lets both
# workers fill while the device copies from the first.
PREFETCH_BUFFERS, PREFETCH_WORKERS = 3, 2


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device``: augmentation draws happen where the batch lives."""
    return torch.Generator(device=device).manual_seed(seed)


class Draws:
    """The random draws of one epoch's batches, whose state a run stopped mid-epoch saves.

    ``gen`` is the seeded torch generator the batches draw from (on the device where they
    are drawn). Augmented images also draw host-side choices (TrivialAugment's op, MixUp's
    lambda) from the augmentation's host generator of ``gen``, which ``gen``'s own state does
    not hold, so ``state()`` keeps both and ``restore`` puts both back.
    """

    def __init__(self, device: torch.device, seed: int, augment: Optional[BatchAugment] = None) -> None:
        self.gen, self.augment = _generator(device, seed), augment

    def state(self) -> dict:
        """Tensors and plain numbers only: it travels inside ``last.pt`` (loaded with weights_only)."""
        out: dict = {"torch": self.gen.get_state()}
        if self.augment is not None:
            out["host"] = self.augment.host_rng(self.gen).bit_generator.state
        return out

    def restore(self, state: dict) -> None:
        self.gen.set_state(state["torch"])
        if self.augment is not None and "host" in state:
            self.augment.host_rng(self.gen).bit_generator.state = state["host"]


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) as 0-d device tensors."""
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


def gpu_resident_bytes(device: torch.device) -> int:
    """Bytes of a cache allowed on the GPU: a third of the memory free for new tensors.

    ``mem_get_info`` counts the caching allocator's reserved but unused blocks as taken; in a
    sweep (trials in one process) the previous trial's blocks would push the next onto the
    slower host path, so they count as free here.
    """
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) // 3


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the read-only memory map, without torch's 'not writable' warning: it is only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


class IndexedRows:
    """``array[idx]`` read one slice of ``idx`` at a time, so a memory map is never copied whole."""

    def __init__(self, array: np.ndarray, idx: np.ndarray) -> None:
        self.array, self.idx = array, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.array[self.idx[rows]])


class ImageSource:
    """Augmented images; on a GPU the whole uint8 cache is copied there once when it fits.

    Otherwise (a GPU that is too small) worker threads gather the next batches into reused
    pinned buffers while the current one trains, and the copies to the GPU do not block.
    ``resident``, ``prefetch`` and ``pin`` choose these paths explicitly (None: from the
    device), so the thread path also runs, and is tested, on the CPU.
    """

    def __init__(self, model: nn.Module, data: TrainData, spec: ModelSpec, aug_cfg: Any, precision: Precision,
                 device: torch.device, *, channels_last: bool, eval_batch_size: int, tta_flip: bool,
                 resident: Optional[bool] = None, prefetch: Optional[bool] = None,
                 pin: Optional[bool] = None) -> None:
        self.module, self.data, self.spec, self.precision, self.device = model, data, spec, precision, device
        self.channels_last, self.eval_batch_size, self.tta_flip = channels_last, eval_batch_size, tta_flip
        on_gpu = device.type == "cuda"
        self.prefetch = on_gpu if prefetch is None else prefetch
        self.pin = on_gpu if pin is None else pin
        if resident is None:
            resident = on_gpu and data.images.nbytes <= gpu_resident_bytes(device)
        self.augment = BatchAugment(aug_cfg, spec.mean, spec.std, spec.num_classes)
        self.labels = torch.from_numpy(data.labels).to(device)  # (N,)
        self.resident: Optional[torch.Tensor] = None
        if resident:
            self.resident = _read_only_tensor(data.images).to(device)  # (N, S, S, 3) uint8
        val_idx = torch.from_numpy(data.val_idx)
        self.val_images = (self.resident[val_idx.to(device)] if self.resident is not None
                           else np.asarray(data.images[data.val_idx]))
        self.val_labels = self.labels[val_idx.to(device)]
        self.kind = "images (GPU-resident)" if self.resident is not None else "images"

    def draws(self, seed: int) -> Draws:
        return Draws(self.device, seed, self.augment)

    def batches(self, perm: np.ndarray, batch_size: int, n_batches: int, seed: int = 0, *, start: int = 0,
                draws: Optional[Draws] = None) -> Iterator[Batch]:
        gen = (draws if draws is not None else self.draws(seed)).gen
        if self.resident is not None:
            order = torch.from_numpy(perm).to(self.device)  # one copy per epoch, sliced per step
            for b in range(start, n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                yield self._finish(self.resident[idx], self.labels[idx], gen)
            return
        chunks = [np.sort(perm[b * batch_size:(b + 1) * batch_size]) for b in range(start, n_batches)]  # sorted reads
        if not self.prefetch:
            for idx in chunks:
                yield self._finish(torch.from_numpy(np.array(self.data.images[idx])),
                                   self.labels[torch.from_numpy(idx)], gen)
            return
        yield from self._prefetched(chunks, gen)

    def _prefetched(self, chunks: list, gen: torch.Generator) -> Iterator[Batch]:
        """Batches gathered ahead on PREFETCH_WORKERS threads into PREFETCH_BUFFERS reused host buffers.

        Batch b fills buffer ``b % n`` with one ``np.take`` per array (images and labels, no
        temporary copy); the buffer is refilled for batch b + n once its copy to the device
        is done (an event the worker waits on, so the training thread never does).
        """
        if not chunks:
            return
        n_buffers = min(PREFETCH_BUFFERS, len(chunks))
        rows = max(len(idx) for idx in chunks)
        images = [torch.empty((rows, *self.data.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
                  for _ in range(n_buffers)]  # (B, S, S, 3)
        labels = [torch.empty(rows, dtype=torch.int64, pin_memory=self.pin) for _ in range(n_buffers)]
        copy_to_device = self.device.type != "cpu"  # on the CPU .to() would hand out the buffer itself

        def fill(i: int, idx: np.ndarray, copied: Optional[torch.cuda.Event]) -> Tuple[torch.Tensor, torch.Tensor]:
            if copied is not None:
                copied.synchronize()  # the previous batch in this buffer has reached the device
            x, y = images[i][:len(idx)], labels[i][:len(idx)]
            np.take(self.data.images, idx, axis=0, out=x.numpy(), mode="clip")  # clip: no buffered copy
            np.take(self.data.labels, idx, out=y.numpy(), mode="clip")
            return x, y

        pool = ThreadPoolExecutor(max_workers=PREFETCH_WORKERS)
        try:
            ahead = deque(pool.submit(fill, b, chunks[b], None) for b in range(n_buffers))
            for b in range(len(chunks)):
                x, y = ahead.popleft().result()  # in batch order; a worker's exception surfaces here
                if copy_to_device:
                    x, y = x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)
                else:
                    x, y = x.clone(), y.clone()
                batch = self._finish(x, y, gen)
                if b + n_buffers < len(chunks):
                    copied = torch.cuda.Event() if self.device.type == "cuda" else None
                    if copied is not None:
                        copied.record()  # after the copies and the augmentation that reads them
                    ahead.append(pool.submit(fill, b % n_buffers, chunks[b + n_buffers], copied))
                yield batch
        finally:  # also when the loop breaks on the budget: no thread outlives the epoch
            pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self, u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
        x, y = self.augment(u8.to(self.device), y, gen)  # (B, 3, S, S) normalised, y or soft targets
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def evaluate(self, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = batched_logits(model, self.val_images, self.spec.mean, self.spec.std, self.precision,
                                batch_size=self.eval_batch_size, tta_flip=self.tta_flip, device=self.device,
                                channels_last=self.channels_last, keep_on_device=True)
        return _metrics(logits, self.val_labels)


class FeatureSource:
    """The linear probe: the frozen backbone's features of every train/ image, computed once.

    The probe trains only the head, so the backbone's output for an image never changes:
    computing it once turns each epoch into a few matrix products.
    """

    def __init__(self, model: InatModel, data: TrainData, spec: ModelSpec, precision: Precision,
                 device: torch.device, *, channels_last: bool, eval_batch_size: int, progress: bool) -> None:
        backbone_fn, self.module = features_and_head(model)
        self.device = device
        norm = Normalizer(spec.mean, spec.std, device, channels_last=channels_last)
        with eval_mode(model):
            self.features = forward_batches(backbone_fn, data.images, norm, precision, batch_size=eval_batch_size,
                                            device=device, keep_on_device=True,
                                            progress="backbone features (once)" if progress else None)  # (N, D)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.val_idx = torch.from_numpy(data.val_idx).to(device)
        self.bytes = self.features.numel() * 4
        self.kind = "backbone features (cached)"

    def draws(self, seed: int) -> Draws:
        return Draws(torch.device("cpu"), seed)  # nothing is drawn: every epoch reads the same features

    def batches(self, perm: np.ndarray, batch_size: int, n_batches: int, seed: int = 0, *, start: int = 0,
                draws: Optional[Draws] = None) -> Iterator[Batch]:
        order = torch.from_numpy(perm).to(self.device)
        for b in range(start, n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield self.features[idx], self.labels[idx]

    def evaluate(self, model: InatModel) -> Tuple[torch.Tensor, torch.Tensor]:
        head = model.head()  # the trained head, or its EMA copy
        with eval_mode(head):
            logits = head(self.features[self.val_idx]).float()
        return _metrics(logits, self.labels[self.val_idx])


class PrefixViewSource:
    """Partial fine-tuning's fast path: the frozen first k groups run once per cached view.

    The frozen prefix (eval mode, ImageNet BN statistics) is a fixed function of its input,
    so its output for ``finetune.cache_views`` augmented views of each training image (and
    for the plain and, with TTA, mirrored validation images) is computed once and stored in
    bf16, on the GPU when it fits; every epoch then trains only the suffix, on a randomly
    drawn view per image, gathered where the cache lives.
    Views are drawn from their own seeded generators, so a resumed run rebuilds the same cache.
    """

    def __init__(self, model: InatModel, data: TrainData, spec: ModelSpec, aug_cfg: Any, ft_cfg: Any,
                 precision: Precision, device: torch.device, *, seed: int, channels_last: bool,
                 eval_batch_size: int, tta_flip: bool, progress: bool) -> None:
        if ft_cfg.bn == "train_all":
            raise InatError("finetune.cache_views needs the frozen groups' BatchNorm frozen (finetune.bn=freeze_frozen "
                            "or freeze_all): with bn=train_all their statistics change and no output can be cached.")
        prefix, self.module = split_at(model, int(ft_cfg.k))
        self.k = int(ft_cfg.k)
        self.device, self.precision, self.eval_batch_size = device, precision, eval_batch_size
        self.channels_last = channels_last
        norm = Normalizer(spec.mean, spec.std, device, channels_last=channels_last)
        augment = BatchAugment(aug_cfg, spec.mean, spec.std, spec.num_classes)
        views, train_idx, val_idx = int(ft_cfg.cache_views), data.train_idx, data.val_idx
        labels = torch.from_numpy(data.labels)

        def run(idx: np.ndarray, prepare, desc: Optional[str] = None, keep: bool = False) -> torch.Tensor:
            return forward_batches(prefix, IndexedRows(data.images, idx), prepare, precision,
                                   batch_size=eval_batch_size, device=device, out_dtype=torch.bfloat16,
                                   keep_on_device=keep, progress=desc)

        with eval_mode(model):
            probe = run(train_idx[:2], norm)
            per_item = probe[0].numel() * 2
            self.bytes = per_item * (views * len(train_idx) + 2 * len(val_idx))
            # The cache stays on the GPU when it fits, by the image cache's rule; else it is host memory.
            store = device if device.type != "cuda" or self.bytes <= gpu_resident_bytes(device) else torch.device("cpu")
            keep = store.type == device.type
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if store.type == "cpu" and self.bytes > total / 2:
                raise InatError(f"finetune.cache_views={views} would keep {self.bytes / 2**30:.1f} GB of frozen-prefix "
                                f"outputs ({tuple(probe.shape[1:])} per image), more than half of this machine's "
                                f"{total / 2**30:.0f} GB; use fewer views or a larger finetune.k.")
            # Filled view by view: at most one view's outputs exist twice, never the whole cache.
            self.train_x = torch.empty((views, len(train_idx), *probe.shape[1:]), dtype=torch.bfloat16,
                                       device=store)  # (V, n_train, C, H, W)
            self.train_y: Optional[torch.Tensor] = None  # (V, n_train) labels or (V, n_train, classes) soft targets
            train_labels = labels[train_idx].to(device)  # moved once, sliced per batch
            for v in range(views):
                gen = torch.Generator(device=device).manual_seed(seed * 1000 + SEED_VIEWS + 7919 * v)
                targets: list = []
                done = [0]  # images already augmented in this view (forward_batches keeps their order)

                def augmented(u8: torch.Tensor) -> torch.Tensor:
                    y = train_labels[done[0]:done[0] + len(u8)]
                    done[0] += len(u8)
                    x, y = augment(u8, y, gen)  # y may become soft targets (mixup)
                    targets.append(y)
                    return x.contiguous(memory_format=torch.channels_last) if channels_last else x

                self.train_x[v] = run(train_idx, augmented, f"frozen prefix, view {v + 1}/{views}" if progress else None,
                                      keep)
                view_y = torch.cat(targets)
                if self.train_y is None:
                    self.train_y = torch.empty((views, *view_y.shape), dtype=view_y.dtype, device=store)
                self.train_y[v] = view_y
            self.val_x = run(val_idx, norm, keep=keep)
            self.val_flip = run(val_idx, lambda u8: norm(u8).flip(3), keep=keep) if tta_flip else None
        self.position = torch.full((len(data.images),), -1, dtype=torch.int64)  # image index -> row in train_x
        self.position[torch.from_numpy(train_idx)] = torch.arange(len(train_idx))
        self.position = self.position.to(store)
        self.val_labels = labels[val_idx].to(device)
        self.kind = f"frozen-prefix outputs of {self.k} groups (cached{', GPU-resident' if store.type == 'cuda' else ''})"

    def draws(self, seed: int) -> Draws:
        return Draws(self.train_x.device, seed)  # which view each image shows, drawn where the cache lives

    def batches(self, perm: np.ndarray, batch_size: int, n_batches: int, seed: int = 0, *, start: int = 0,
                draws: Optional[Draws] = None) -> Iterator[Batch]:
        store = self.train_x.device
        pick_gen = (draws if draws is not None else self.draws(seed)).gen
        order = torch.from_numpy(perm).to(store)  # one copy per epoch, sliced per step
        for b in range(start, n_batches):
            pos = self.position[order[b * batch_size:(b + 1) * batch_size].sort().values]
            pick = torch.randint(self.train_x.shape[0], (len(pos),), generator=pick_gen, device=store)
            x, y = self.train_x[pick, pos], self.train_y[pick, pos]  # type: ignore[index]
            if store.type != self.device.type:  # a host cache: the gather is copied to the GPU
                x, y = to_device_batch(x, self.device), to_device_batch(y, self.device)
            yield x.float(), y

    def evaluate(self, model: InatModel) -> Tuple[torch.Tensor, torch.Tensor]:
        suffix = split_at(model, self.k, check=False)[1]  # the trained suffix, or the EMA model's

        def fn(x: torch.Tensor) -> torch.Tensor:
            return suffix(x).float()

        def cast(x: torch.Tensor) -> torch.Tensor:
            return x.float()

        with eval_mode(model):
            logits = forward_batches(fn, self.val_x, cast, self.precision, batch_size=self.eval_batch_size,
                                     device=self.device, keep_on_device=True)
            if self.val_flip is not None:
                flipped = forward_batches(fn, self.val_flip, cast, self.precision, batch_size=self.eval_batch_size,
                                          device=self.device, keep_on_device=True)
                logits = (logits + flipped) / 2
        return _metrics(logits, self.val_labels)
