"""The reviewed GPU defects of the data side (../shared/reviews/gpu-2026-12-02.md E5, E8, E9, E12, E16,
E17, E19, E23), each shown on the CPU: CUDA and torch.distributed are mocked where only a GPU or a
cluster would show them, and the paths behind ``device.type == "cuda"`` run through explicit flags."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import FAST, make_dataset
from inat.config import AugConfig, DataConfig
from inat.errors import InatError
from inat.inference import Precision
from inat.models import ModelSpec
from inat.training import distributed, sources
from inat.training.data import TrainData, load_data
from inat.training.sources import ImageSource

CPU = torch.device("cpu")


def _train_data(tmp_path: Path, n_train: int = 8, size: int = 16) -> TrainData:
    """A decoded tiny dataset (3 classes) and its split, as training reads it: a read-only memory map."""
    from inat.data.folder import scan_train

    root = make_dataset(tmp_path / "data", n_train=n_train, size=size)
    cfg = OmegaConf.structured(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), workers=1))
    spec = ModelSpec("tiny", num_classes=3, input_size=size)
    return load_data(cfg, spec, root, scan_train(root), progress=False)


def _image_source(data: TrainData, **flags) -> ImageSource:
    spec = ModelSpec("tiny", num_classes=3, input_size=data.images.shape[1])
    return ImageSource(nn.Identity(), data, spec, OmegaConf.structured(AugConfig()), Precision("32", "test"), CPU,
                       channels_last=False, eval_batch_size=8, tta_flip=False, **flags)


def _raw_batches(source: ImageSource, perm: np.ndarray, batch_size: int, n_batches: int) -> list:
    """The (uint8 images, labels) each batch carries before augmentation, copied as they arrive."""
    source._finish = lambda u8, y, gen: (u8.clone(), y.clone())
    return list(source.batches(perm, batch_size, n_batches, seed=0))


# --- E5: the budget broadcast runs on a CPU gloo group ----------------------------------------

@pytest.fixture
def two_ranks(monkeypatch):
    """torch.distributed as two ranks would see it, with the collectives recorded instead of run."""
    calls = []
    control = object()  # the gloo side group
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_control", control, raising=False)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "broadcast", lambda t, src, group=None: calls.append(("broadcast", t.device, group)))
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda box, src, group=None: calls.append(("object", None, group)))
    return calls, control


def test_budget_broadcasts_every_8_steps_and_once_per_epoch_on_a_cpu_tensor(two_ranks):
    from inat.training.loop import Budget

    calls, control = two_ranks
    budget = Budget(600, 100, torch.device("cuda", 0))  # a CUDA run: the broadcast must still stay on the host
    budget.start(0.0)
    for step in range(17):  # steps 0, 8 and 16 read rank 0's clock
        budget.tick(step)
    budget.epoch_seconds()
    assert calls == [("broadcast", CPU, control)] * 4
    assert distributed.decide("early_stopping") == "early_stopping"
    assert calls[-1] == ("object", None, control)


# --- E8: a long collective timeout, the setup barrier on gloo -----------------------------------

@pytest.mark.parametrize("device", [torch.device("cuda", 0), CPU])
def test_process_group_and_its_gloo_control_group_wait_long(monkeypatch, device):
    recorded = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "_control", None, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    monkeypatch.setattr(dist, "init_process_group", lambda b, **kw: recorded.update(init=(b, kw)))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "new_group", lambda **kw: recorded.setdefault("groups", []).append(kw) or "gloo-group")
    distributed.init(device)
    name, kwargs = recorded["init"]
    assert name == backend and kwargs["timeout"] >= timedelta(hours=1)
    if device.type == "cuda":  # one side group, created at init, with the same long timeout
        assert recorded["groups"] == [{"backend": "gloo", "timeout": kwargs["timeout"]}]
        assert distributed.control_group() == "gloo-group"
    else:  # the default group is gloo already
        assert "groups" not in recorded and distributed.control_group() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_ranks(worker, args: tuple, timeout: float) -> None:
    """Run ``worker(rank, *args)`` on two spawned processes; fail (killing them) if they outlive ``timeout``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=2):
            if time.time() > deadline:
                pytest.fail(f"the ranks did not finish within {timeout:.0f} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _rank_env(rank: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"})


def _barrier_worker(rank: int, port: int, timeout_s: float, sleep_s: float, out: str) -> None:
    _rank_env(rank, port)
    distributed.COLLECTIVE_TIMEOUT = timedelta(seconds=timeout_s)
    distributed.init(CPU)
    t0 = time.perf_counter()
    try:
        distributed.local_first(lambda: time.sleep(sleep_s) if rank == 0 else None)
        result = "ok"
    except RuntimeError as err:
        result = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"result": result, "seconds": time.perf_counter() - t0}))


@pytest.mark.timeout(120)
def test_local_first_barrier_waits_as_long_as_the_configured_timeout(tmp_path):
    """The configured timeout is the one the barrier uses: 2 s is too short for a 6 s rank 0, 30 s is not."""
    for timeout_s, ok in ((2.0, False), (30.0, True)):
        out = tmp_path / str(timeout_s)
        out.mkdir()
        _join_ranks(_barrier_worker, (_free_port(), timeout_s, 6.0, str(out)), timeout=90)
        rank1 = json.loads((out / "rank1.json").read_text())
        if ok:
            assert rank1["result"] == "ok" and rank1["seconds"] >= 5.5
        else:
            assert "Timed out" in rank1["result"] and rank1["seconds"] < 5.0


def _slow_cache_worker(rank: int, port: int, overrides: list, run_dir: str, sleep_s: float) -> None:
    _rank_env(rank, port)
    distributed.COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # short, yet longer than rank 0's slow build
    if rank == 0:
        import inat.data.cache as cache

        real = cache._build

        def slow_build(*args, **kwargs):
            time.sleep(sleep_s)  # a slow first download/decode on local rank 0
            return real(*args, **kwargs)

        cache._build = slow_build
    from test_engine import compose

    from inat.training import fit

    fit(compose(overrides), Path(run_dir))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_waits_for_a_slow_rank_zero_cache_build(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8)
    run = tmp_path / "run"
    overrides = [f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
                 "train.then_test=false", "train.batch_size=4", f"hydra.run.dir={run}"]
    _join_ranks(_slow_cache_worker, (_free_port(), overrides, str(run), 8.0), timeout=240)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1


# --- E9: the decode pool does not fork a process that may hold CUDA and NCCL threads ------------

def test_decode_pool_starts_workers_without_fork(tmp_path, monkeypatch):
    import inat.data.cache as cache
    from inat.data.folder import scan_train

    contexts = []
    real_pool = cache.ProcessPoolExecutor

    def spy(*args, **kwargs):
        contexts.append(kwargs.get("mp_context"))
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(cache, "ProcessPoolExecutor", spy)
    folder = scan_train(make_dataset(tmp_path / "data", n_train=22, size=16))  # 66 files: enough for the pool
    pooled = cache.load_or_build(folder.paths, 16, directory=str(tmp_path / "pooled"), workers=2, progress=False)
    assert len(contexts) == 1 and contexts[0] is not None
    assert contexts[0].get_start_method() in ("forkserver", "spawn")
    serial = cache.load_or_build(folder.paths, 16, directory=str(tmp_path / "serial"), workers=1, progress=False)
    assert np.array_equal(pooled.images, serial.images) and pooled.sha1 == serial.sha1


# --- E12: ranks that read different datasets stop with one sentence -----------------------------

def test_load_data_stops_when_rank_0_read_other_images(tmp_path, monkeypatch):
    gathered = []
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_control", object(), raising=False)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, group=None: None)

    def all_gather_object(out, value, group=None):  # rank 0's node has one image fewer than this one
        gathered.append(value)
        out[:] = [(value[0] - 1, "0" * 64), value]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    with pytest.raises(InatError, match="different datasets"):
        _train_data(tmp_path)
    assert gathered and gathered[0][0] == 24  # one gather, of (number of images, hash)


def _own_copy_worker(rank: int, port: int, overrides: list, roots: list, run_dir: str) -> None:
    _rank_env(rank, port)
    from test_engine import compose

    from inat.training import fit

    try:
        fit(compose([*overrides, f"data.root={roots[rank]}"]), Path(run_dir))
        said = ""
    except InatError as err:
        said = str(err)
    Path(run_dir, f"rank{rank}.said").write_text(said)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_nodes_with_different_copies_stop_instead_of_hanging(tmp_path):
    roots = [make_dataset(tmp_path / "node0", n_train=8), make_dataset(tmp_path / "node1", n_train=8)]
    extra = roots[1] / "train" / "class_0"
    (extra / "one_more.png").write_bytes((extra / "train_0_1.png").read_bytes())  # node 1's copy has one file more
    run = tmp_path / "run"
    overrides = [*FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.then_test=false",
                 "train.batch_size=4", f"hydra.run.dir={run}"]
    run.mkdir()
    _join_ranks(_own_copy_worker, (_free_port(), overrides, [str(r) for r in roots], str(run)), timeout=240)
    said = [(run / f"rank{r}.said").read_text() for r in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("The ranks read different datasets"), said
    assert "rank 0 24, rank 1 25" in said[0]
    assert not (run / "checkpoints").exists()


def test_ranks_with_different_datasets_refuse_in_one_sentence(monkeypatch):
    from inat.training.data import check_same_images, images_fingerprint

    sha1, labels = ["a" * 40, "b" * 40, "c" * 40], np.array([0, 0, 1])
    copies = {"the same copy": (sha1, labels), "one file more": (sha1 + ["d" * 40], np.array([0, 0, 1, 1])),
              "another file": (sha1[:2] + ["e" * 40], labels), "another class": (sha1, np.array([0, 1, 1]))}
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "_control", object(), raising=False)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name, copy in copies.items():
        rank1 = images_fingerprint(*copy)
        monkeypatch.setattr(dist, "all_gather_object", lambda out, value, group=None: out.__setitem__(
            slice(None), [value, rank1]))
        if name == "the same copy":
            check_same_images(sha1, labels)
            continue
        with pytest.raises(InatError, match=rf"^The ranks read different datasets .*rank 0 3, rank 1 {len(copy[0])}\b"
                                            r".*same copy of the dataset\.$"):
            check_same_images(sha1, labels)


# --- E16: the prefetch path, on the CPU ----------------------------------------------------------

def test_image_source_on_the_cpu_stays_on_the_plain_path(tmp_path):
    source = _image_source(_train_data(tmp_path))
    assert source.resident is None and not source.prefetch and not source.pin


@pytest.mark.parametrize("batch_size, n_batches", [(3, 5), (64, 1)])  # several batches; one share under a batch
def test_prefetch_threads_yield_the_plain_paths_batches(tmp_path, batch_size, n_batches):
    data = _train_data(tmp_path)
    perm = np.random.default_rng(0).permutation(data.train_idx)
    plain = _raw_batches(_image_source(data), perm, batch_size, n_batches)
    threaded = _raw_batches(_image_source(data, prefetch=True, pin=False), perm, batch_size, n_batches)
    assert len(plain) == len(threaded) == n_batches
    for b, ((x0, y0), (x1, y1)) in enumerate(zip(plain, threaded)):
        idx = np.sort(perm[b * batch_size:(b + 1) * batch_size])
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x1, torch.from_numpy(np.asarray(data.images[idx])))
        assert torch.equal(y1, torch.from_numpy(data.labels[idx]))


def test_prefetch_batches_are_augmented_like_the_plain_ones(tmp_path):
    data = _train_data(tmp_path)
    perm = data.train_idx[::-1].copy()
    plain = list(_image_source(data).batches(perm, 4, 3, seed=5))
    threaded = list(_image_source(data, prefetch=True, pin=False).batches(perm, 4, 3, seed=5))
    for (x0, y0), (x1, y1) in zip(plain, threaded):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_closing_the_prefetch_generator_stops_its_threads(tmp_path):
    data = _train_data(tmp_path)
    baseline = threading.active_count()
    batches = _image_source(data, prefetch=True, pin=False).batches(data.train_idx, 2, 6, seed=0)
    next(batches), next(batches)
    assert threading.active_count() > baseline
    batches.close()  # what a break on the time budget does
    assert threading.active_count() == baseline


def test_a_prefetch_workers_error_surfaces(tmp_path):
    class Unreadable(np.ndarray):
        def take(self, *args, **kwargs):
            raise OSError("Input/output error")

    data = _train_data(tmp_path)
    data.images = data.images.view(Unreadable)
    baseline = threading.active_count()
    with pytest.raises(OSError, match="Input/output error"):
        list(_image_source(data, prefetch=True, pin=False).batches(data.train_idx, 2, 4, seed=0))
    assert threading.active_count() == baseline


# --- E17: free GPU memory counts the allocator's unused blocks -----------------------------------

def test_gpu_budget_counts_reserved_but_unallocated_memory_as_free(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 9 * gib)  # the last sweep trial's cache
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)
    assert sources.gpu_resident_bytes(torch.device("cuda", 0)) == (3 + 6) * gib // 3
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)  # nothing cached: as before
    assert sources.gpu_resident_bytes(torch.device("cuda", 0)) == gib


# --- E19: the cached-views fast path keeps its cache where it trains --------------------------------

STRONG = dict(name="strong", shift=0, crop_scale=0.35, color=0.3, cutmix=1.0, erasing=0.25)  # conf/aug/strong.yaml


def _prefix_source(tmp_path: Path, aug: dict, views: int = 2):
    from inat.config import FinetuneConfig, ModelConfig
    from inat.models import create_model

    data = _train_data(tmp_path, n_train=6, size=32)
    torch.manual_seed(0)
    model = create_model(OmegaConf.structured(ModelConfig(name="efficientnet_lite0", pretrained=False)),
                         num_classes=3, image_size=32)
    ft = OmegaConf.structured(FinetuneConfig(strategy="partial", k=7, cache_views=views))
    aug_cfg = OmegaConf.structured(AugConfig(**aug))
    source = sources.PrefixViewSource(model, data, model.spec, aug_cfg, ft, Precision("32", "test"), CPU, seed=4,
                                      channels_last=False, eval_batch_size=5, tta_flip=True, progress=False)
    return source, model, data, aug_cfg


def _views_as_before(model, data, aug_cfg, views: int, seed: int, batch_size: int):
    """The view cache as the first version built it: each view on the host, then torch.stack of them all."""
    from inat.data.augment import BatchAugment
    from inat.inference import eval_mode
    from inat.models.freeze import split_at
    from inat.training.data import SEED_VIEWS

    prefix = split_at(model, 7)[0]
    augment = BatchAugment(aug_cfg, model.spec.mean, model.spec.std, model.spec.num_classes)
    xs, ys = [], []
    with eval_mode(model), torch.no_grad():
        for v in range(views):
            gen = torch.Generator().manual_seed(seed * 1000 + SEED_VIEWS + 7919 * v)
            parts = []
            for start in range(0, len(data.train_idx), batch_size):
                idx = data.train_idx[start:start + batch_size]
                x, y = augment(torch.from_numpy(np.array(data.images[idx])), torch.from_numpy(data.labels[idx]), gen)
                parts.append((prefix(x).to(torch.bfloat16), y))
            xs.append(torch.cat([x for x, _ in parts]))
            ys.append(torch.cat([y for _, y in parts]))
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("aug", [{}, STRONG], ids=["basic", "strong"])
def test_prefix_views_and_their_batches_are_the_ones_built_before(tmp_path, aug):
    source, model, data, aug_cfg = _prefix_source(tmp_path, aug)
    train_x, train_y = _views_as_before(model, data, aug_cfg, views=2, seed=4, batch_size=5)
    assert torch.equal(source.train_x, train_x) and torch.equal(source.train_y, train_y)
    perm = np.random.default_rng(1).permutation(data.train_idx)
    position = np.full(len(data.images), -1)
    position[data.train_idx] = np.arange(len(data.train_idx))
    pick_gen = torch.Generator().manual_seed(9)
    for b, (x, y) in enumerate(source.batches(perm, 4, 3, seed=9)):  # the draw of the first version, step by step
        pos = torch.from_numpy(position[np.sort(perm[b * 4:(b + 1) * 4])])
        pick = torch.randint(2, (len(pos),), generator=pick_gen)
        assert torch.equal(x, train_x[pick, pos].float()) and torch.equal(y, train_y[pick, pos])


def test_prefix_view_cache_is_filled_in_place_not_stacked(tmp_path, monkeypatch):
    """No whole second copy of the cache in memory while it is built (torch.stack of all views held two)."""
    largest = [0]
    for name in ("stack", "cat"):
        real = getattr(torch, name)

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            largest[0] = max(largest[0], out.numel())
            return out

        monkeypatch.setattr(torch, name, spy)
    source, *_ = _prefix_source(tmp_path, {}, views=3)
    assert source.train_x.shape[0] == 3
    assert 0 < largest[0] <= source.train_x[0].numel()  # one view at most


def test_prefix_view_batches_are_gathered_where_the_cache_lives(tmp_path, monkeypatch):
    """On the device that trains (here the CPU; on a GPU when the cache fits) a batch is no host gather + copy."""
    source, _, data, _ = _prefix_source(tmp_path, {})
    assert source.train_x.device == source.train_y.device == CPU
    copies = []
    monkeypatch.setattr(sources, "to_device_batch", lambda *args: copies.append(args) or args[0])
    batches = list(source.batches(data.train_idx, 4, 3, seed=0))
    assert len(batches) == 3 and copies == []


# --- E23: the read-only memory map becomes a tensor without a warning ----------------------------

def test_resident_cache_from_the_read_only_memory_map_warns_nothing(tmp_path):
    data = _train_data(tmp_path)
    assert not data.images.flags.writeable
    torch._C._set_warnAlways(True)  # torch warns once per process: an earlier test must not hide it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            source = _image_source(data, resident=True)
    finally:
        torch._C._set_warnAlways(False)
    assert source.resident is not None and source.kind == "images (GPU-resident)"
