"""Preemption: a stop signal mid-epoch writes last.pt and exits resumable; resume=auto goes on bit-exact.

The signal is sent by the test, never by a hook inside the loop: a global optimizer step
post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) sends it to the process
itself after step k, in a subprocess through a small wrapper around run.py (:data:`WRAPPER`)
or in-process around ``fit``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, REPO, make_dataset, run_cli
from inat.errors import EXIT_RESUMABLE, InatError, Preempted
from test_engine import _free_port, compose
from test_faults import assert_one_error
from test_train import read_metrics

# run.py with a signal sent to itself after optimizer step STEP: `python wrapper.py STEP SIGNAL run.py ARGS...`.
WRAPPER = '''\
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook

step, name = int(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[3:]
done = [0]


def send(optimizer, args, kwargs):
    done[0] += 1
    if done[0] == step:
        os.kill(os.getpid(), getattr(signal, name))


register_optimizer_step_post_hook(send)
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# 36 images, 30 for training: 3 batches of 8 per epoch, 9 steps in all. Dropout, EMA, TrivialAugment and
# MixUp make every random stream matter: the global RNG, the augmentation's generator and its host draws.
OPTS = ["train.epochs=3", "train.precision=32", "train.then_test=false", "model.dropout=0.3", "train.ema=0.9",
        "aug.trivial_augment=true", "aug.mixup=0.2"]
if torch.cuda.is_available():  # cuDNN autotuning may pick other (nondeterministic) kernels in each process
    OPTS.append("train.deterministic=true")


def signalled(step: int, name: str, args: list, env: dict) -> subprocess.CompletedProcess:
    """run.py ARGS in a subprocess that sends itself signal ``name`` after optimizer step ``step``."""
    wrapper = Path(env["INAT_CACHE"]).parent / "signal_at_step.py"
    wrapper.write_text(WRAPPER)
    full_env = {**os.environ, **env}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(wrapper), str(step), name, str(REPO / "run.py"), *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=600)


def offline(args: list) -> list:
    return [a for a in args if not a.startswith("wandb.")] + ["wandb.mode=offline"]


def weights(path: Path, key: str = "model") -> dict:
    return torch.load(path, weights_only=False)[key]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """An uninterrupted run; the same run SIGTERMed after step 5 (epoch 2, batch 2 of 3); then resume=auto."""
    root = tmp_path_factory.mktemp("preempt")
    data = make_dataset(root / "data", n_train=12)
    env = {"INAT_CACHE": str(root / "cache"), "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    whole, broken = root / "whole", root / "broken"
    base = [f"data.root={data}", *FAST, *OPTS]
    done = run_cli([*base, f"hydra.run.dir={whole}"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    wandb_env = {**env, "WANDB_MODE": "offline"}
    stop = signalled(5, "SIGTERM", offline([*base, f"hydra.run.dir={broken}"]), wandb_env)
    after_stop = {
        "files": sorted(str(p.relative_to(broken)) for p in broken.rglob("*") if "wandb" not in p.parts),
        "last": torch.load(broken / "checkpoints/last.pt", weights_only=False),
        "metrics": read_metrics(broken, timing=False),
        "wandb_runs": sorted(p.name for p in (broken / "wandb").glob("offline-run-*")),
    }
    resumed = run_cli(offline([*base, f"hydra.run.dir={broken}", "resume=auto"]), env=wandb_env)
    return {"whole": whole, "broken": broken, "stop": stop, "after_stop": after_stop, "resumed": resumed,
            "base": base, "env": env}


def test_sigterm_mid_epoch_writes_last_pt_and_exits_resumable(stopped):
    stop, after = stopped["stop"], stopped["after_stop"]
    assert stop.returncode == EXIT_RESUMABLE == 75, stop.stderr[-2000:]
    message = stop.stderr.strip().splitlines()[-1]
    assert message.startswith("Stopped by SIGTERM in epoch 2/3 after batch 2/3"), message
    assert f"resume=auto hydra.run.dir={stopped['broken']}" in message and "Traceback" not in stop.stderr
    assert "stopped by SIGTERM in epoch 2/3 after batch 2/3" in stop.stdout
    state = after["last"]["state"]
    assert state["step"] == 5 and state["epoch"] == 1  # one epoch done, two steps into the second
    partial = state["partial"]
    assert (partial["epoch"], partial["batches"], partial["of"], len(partial["ranks"])) == (1, 2, 3, 1)
    assert partial["ranks"][0]["seen"] == 16
    # Nothing half-written: no temp file, no summary, metrics.csv only for the epoch that ended.
    assert not [f for f in after["files"] if f.endswith(".tmp")], after["files"]
    assert "summary.json" not in after["files"] and len(after["metrics"]) == 1
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "metrics.csv", "split.json"} <= set(after["files"])


def test_resume_auto_after_sigterm_matches_the_uninterrupted_run(stopped):
    whole, broken, resumed = stopped["whole"], stopped["broken"], stopped["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from epoch 1, 2 of 3 batches into epoch 2" in resumed.stdout
    assert read_metrics(broken, timing=False) == read_metrics(whole, timing=False)
    for name in ("last.pt", "best.pt"):
        for key in ("model", "ema"):
            assert same_weights(weights(whole / "checkpoints" / name, key), weights(broken / "checkpoints" / name, key))
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["epochs"] == 3
    assert "partial" not in torch.load(broken / "checkpoints/last.pt", weights_only=False)["state"]
    assert not list(broken.rglob("*.tmp"))


def test_the_resumed_run_continues_the_same_wandb_run(stopped):
    after, broken = stopped["after_stop"], stopped["broken"]
    first = after["last"]["wandb_id"]
    assert first and len(after["wandb_runs"]) == 1 and after["wandb_runs"][0].endswith(f"-{first}")
    assert torch.load(broken / "checkpoints/last.pt", weights_only=False)["wandb_id"] == first
    runs = sorted(p.name for p in (broken / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{first}") for name in runs), runs  # two starts, one run id


def test_resume_auto_refuses_a_finished_run_and_keeps_its_record(stopped):
    whole = stopped["whole"]
    record = {name: (whole / name).read_bytes() for name in (".hydra/config.yaml", ".hydra/overrides.yaml")}
    done = run_cli([*stopped["base"], f"hydra.run.dir={whole}", "resume=auto"], env=stopped["env"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert_one_error(done.stderr, "resume=auto", "finished run", "summary.json", "stop reason 'epochs'")
    assert {name: (whole / name).read_bytes() for name in record} == record


def test_resume_auto_starts_fresh_in_a_folder_killed_before_its_first_checkpoint(tmp_path):
    data = make_dataset(tmp_path / "data", n_classes=2, n_train=6, n_test=2, size=24)
    run = tmp_path / "run"
    env = {"INAT_CACHE": str(tmp_path / "cache")}
    args = [f"data.root={data}", *FAST, "train.epochs=1", "train.then_test=false", f"hydra.run.dir={run}",
            "resume=auto"]
    killed = signalled(1, "SIGKILL", args, env)
    assert killed.returncode == -9
    assert "holds no run yet" in killed.stdout  # a folder that does not exist yet: a fresh start
    left = sorted(str(p.relative_to(run)) for p in run.iterdir())
    assert not (run / "checkpoints" / "last.pt").exists() and "split.json" in left, left  # what a kill leaves
    done = run_cli(args, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resume=auto" in done.stdout and "holds no run yet; training from the start" in done.stdout
    assert (run / "summary.json").is_file()


# --- which folders resume=auto resumes, starts in, or refuses (no training) ------------------------------

def _tmp_name(name: str) -> str:
    return f".{name}.4242.0123abcd.tmp"  # runs.temp_path's shape


@pytest.mark.parametrize("files, needle", [
    ([], None),
    ([".hydra/config.yaml", ".hydra/overrides.yaml", "run.log", "split.json", ".inat.lock", "wandb/debug.log",
      "wandb/offline-run-20261202_100000-abc12345/run-abc12345.wandb", f"checkpoints/{_tmp_name('best.pt')}",
      _tmp_name("split.json")], None),
    (["checkpoints/last.pt"], None),  # resumes
    (["checkpoints/last.pt", "notes.txt"], None),  # resumes: with last.pt the folder is a run
    (["checkpoints/last.pt", "summary.json"], "holds a finished run"),
    (["checkpoints/best.pt", "split.json"], "has checkpoints/best.pt and no checkpoints/last.pt"),
    ([".hydra/config.yaml", "notes.txt"], "holds 'notes.txt', which a run does not write"),
    (["metrics.csv", "split.json"], "holds 'metrics.csv'"),
    (["checkpoints/model.pt"], "holds 'checkpoints/model.pt'"),
    (["test/test.json", "a", "b", "c"], "holds 'a', 'b', 'c' and 1 more"),
])
def test_which_folders_resume_auto_accepts(tmp_path, files, needle):
    from inat.training.resume import auto_problem

    run = tmp_path / "run"
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    problem = auto_problem(run)
    if needle is None:
        assert problem is None, problem
    else:
        assert problem is not None and needle in problem and problem.endswith("."), problem
        assert problem.startswith(f"resume=auto but run folder '{run}'")


def test_resume_true_keeps_its_meaning_and_auto_starts_where_nothing_is(tmp_path):
    from inat.training.resume import load_last

    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    assert load_last(empty, {}, False) is None
    assert load_last(empty, {}, "auto") is None
    assert load_last(tmp_path / "not_there", {}, "auto") is None
    with pytest.raises(InatError, match="resume=true but run folder .* has no checkpoints/last.pt"):
        load_last(empty, {}, True)
    (empty / "checkpoints").mkdir()
    (empty / "checkpoints" / "best.pt").write_bytes(b"")
    with pytest.raises(InatError, match="resume=true but .* has checkpoints/best.pt and no"):
        load_last(empty, {}, True)


# --- in-process: other signals, the other input sources, a previous handler ---------------------------------

@pytest.fixture(scope="module")
def fit_root(tmp_path_factory) -> Path:
    """The data (and decode cache) the in-process runs share."""
    root = tmp_path_factory.mktemp("fit")
    make_dataset(root / "data", n_train=12)
    return root


def _fit_args(root: Path, *extra: str) -> list:
    return [f"data.root={root / 'data'}", *FAST, f"data.cache_dir={root / 'cache'}", *OPTS, *extra]


def send_after(step: int, sig: int):
    """Send ``sig`` to this process after its optimizer step ``step`` (a global step post-hook); the hook's handle."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    done = [0]

    def send(optimizer, args, kwargs):
        done[0] += 1
        if done[0] == step:
            os.kill(os.getpid(), sig)

    return register_optimizer_step_post_hook(send)


def _fit_signalled(args: list, run: Path, step: int, sig: int) -> Exception:
    """``fit`` into ``run`` with ``sig`` sent after optimizer step ``step``; the exception it ended with."""
    from inat.training import fit

    handle = send_after(step, sig)
    try:
        with pytest.raises((Preempted, SystemExit)) as stop:
            fit(compose(args), run)
    finally:
        handle.remove()
    return stop.value


SOURCES = {
    "images": [],
    "prefix_views": ["model=efficientnet_lite0", "model.pretrained=false", "model.input_size=48", "finetune=partial",
                     "finetune.k=7", "finetune.cache_views=2"],
    "features": ["model=efficientnet_lite0", "model.pretrained=false", "model.input_size=48", "finetune=linear_probe"],
}


@pytest.mark.parametrize("source, sig, step", [("images", signal.SIGUSR1, 3), ("prefix_views", signal.SIGUSR2, 4),
                                               ("features", signal.SIGTERM, 2)])
def test_each_stop_signal_and_source_resumes_bit_exact(fit_root, tmp_path, source, sig, step):
    """SIGUSR1 after the last step of epoch 1 (the resumed epoch has no batch left); the others mid-epoch."""
    from inat.training import fit

    args = _fit_args(fit_root, *SOURCES[source])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    summary = fit(compose(args), tmp_path / "whole")
    stop = _fit_signalled(args, tmp_path / "broken", step, sig)
    assert isinstance(stop, Preempted) and signal.Signals(sig).name in str(stop)
    assert {s: signal.getsignal(s) for s in before} == before  # fit put the handlers back
    partial = torch.load(tmp_path / "broken/checkpoints/last.pt", weights_only=False)["state"]["partial"]
    assert partial["epoch"] * partial["of"] + partial["batches"] == step
    resumed = fit(compose([*args, "resume=auto"]), tmp_path / "broken")
    assert resumed["steps"] == summary["steps"] and resumed["best_val_accuracy"] == summary["best_val_accuracy"]
    assert read_metrics(tmp_path / "broken", timing=False) == read_metrics(tmp_path / "whole", timing=False)
    last = "checkpoints/last.pt"
    assert same_weights(weights(tmp_path / "whole" / last), weights(tmp_path / "broken" / last))


@pytest.mark.parametrize("exits", [True, False])
def test_a_previous_handler_gets_the_signal_after_last_pt_is_written(fit_root, tmp_path, exits):
    """Like submitit's USR2 handler (requeue, then sys.exit): called after the checkpoint, in place of our exit."""
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    calls = []

    def previous(signum, frame):
        state = torch.load(last, weights_only=False)["state"] if last.exists() else None
        calls.append((signum, state and state.get("partial", {}).get("batches"), signal.getsignal(signum)))
        if exits:
            sys.exit(-1)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        stop = _fit_signalled(_fit_args(fit_root, "train.epochs=2"), tmp_path / "run", 2, signal.SIGUSR2)
        assert signal.getsignal(signal.SIGUSR2) is previous
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert calls == [(signal.SIGUSR2, 2, previous)]  # once, with last.pt at batch 2 and its own handler back
    assert isinstance(stop, SystemExit if exits else Preempted)


def test_a_signal_during_validation_stops_at_the_epoch_end(fit_root, tmp_path, monkeypatch):
    from inat.training import loop

    real = loop.validate

    def signalled_validation(s, model):
        if s.state["epoch"] == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(s, model)

    monkeypatch.setattr(loop, "validate", signalled_validation)
    with pytest.raises(Preempted, match="after epoch 1/3"):
        loop.fit(compose(_fit_args(fit_root)), tmp_path / "run")
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)["state"]
    assert state["epoch"] == 1 and "partial" not in state and len(read_metrics(tmp_path / "run")) == 1


def test_stop_signals_leave_default_and_ignored_handlers_uncalled():
    from inat.training.preemption import StopSignals

    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == [signal.SIGUSR1, signal.SIGTERM] and signals.names() == "SIGUSR1 and SIGTERM"
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        signals.hand_over()  # SIG_IGN and SIG_DFL are not functions: nothing is called, nothing dies
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_batches_from_start_with_saved_draws_are_the_rest_of_the_epoch(tmp_path):
    """ImageSource on both CPU paths: skipped batches are not augmented, the rest is drawn as uninterrupted."""
    from omegaconf import OmegaConf
    from torch import nn

    from inat.config import AugConfig
    from inat.inference import Precision
    from inat.models import ModelSpec
    from test_gpu_defects_data import _train_data

    data = _train_data(tmp_path)
    aug = OmegaConf.structured(AugConfig(trivial_augment=True, mixup=0.4, color=0.2))
    perm = np.random.default_rng(0).permutation(data.train_idx)
    for prefetch in (False, True):
        from inat.training.sources import ImageSource

        source = ImageSource(nn.Identity(), data, ModelSpec("tiny", num_classes=3, input_size=data.images.shape[1]),
                             aug, Precision("32", "test"), torch.device("cpu"), channels_last=False, eval_batch_size=8,
                             tta_flip=False, prefetch=prefetch, pin=False)
        whole = list(source.batches(perm, 3, 4, seed=11))
        draws = source.draws(11)
        first = source.batches(perm, 3, 4, draws=draws)
        next(first)
        next(first)
        saved = torch.load(_save(tmp_path, draws.state()), weights_only=True)  # through a checkpoint's loader
        first.close()
        later = source.draws(11)
        later.restore(saved)
        calls = []
        finish = source._finish
        source._finish = lambda u8, y, gen: calls.append(1) or finish(u8, y, gen)
        rest = list(source.batches(perm, 3, 4, start=2, draws=later))
        assert len(calls) == 2  # the two skipped batches were neither gathered nor augmented
        for (x0, y0), (x1, y1) in zip(whole[2:], rest, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def _save(tmp_path: Path, obj) -> Path:
    path = tmp_path / "draws.pt"
    torch.save(obj, path)
    return path


# --- torchrun: rank 0's signal stops every rank at the same step ------------------------------------------

def _signalled_ddp_worker(rank: int, world_size: int, port: int, overrides: list, run_dir: str, step: int) -> None:
    """test_engine's DDP rank, with SIGTERM sent to rank 0 after its optimizer step ``step``."""
    from test_engine import _ddp_worker

    if rank == 0:
        send_after(step, signal.SIGTERM)
    try:
        _ddp_worker(rank, world_size, port, overrides, run_dir, 1.0, False)
    except Preempted as stop:
        Path(run_dir, f"rank{rank}.stopped.json").write_text(json.dumps({"message": str(stop)}))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_stops_every_rank_at_rank_zeros_signal_and_resumes_bit_exact(tmp_path):
    import torch.multiprocessing as mp

    from test_engine import _run_ddp

    data = make_dataset(tmp_path / "data", n_train=24)
    # 57 training images: 28 per rank, 14 batches of 2, so the budget's broadcast (every 8 steps) falls mid-epoch.
    overrides = [f"data.root={data}", *FAST, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2",
                 "train.then_test=false", "train.batch_size=2", "train.precision=32"]
    whole, _ = _run_ddp(tmp_path / "whole", overrides)
    broken = tmp_path / "broken" / "run"
    broken.mkdir(parents=True)
    # Rank 0 is signalled after step 3; the next broadcast is at batch 8, so both stop after batch 9.
    ranks = mp.start_processes(_signalled_ddp_worker, args=(2, _free_port(), overrides, str(broken), 3), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.time() + 300
    while not ranks.join(timeout=5):
        if time.time() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("DDP ranks hung after the stop signal")
    stopped = [json.loads((broken / f"rank{r}.stopped.json").read_text()) for r in (0, 1)]
    assert "Stopped by SIGTERM in epoch 1/2 after batch 9/14" in stopped[0]["message"] and stopped[1]["message"] == ""
    partial = torch.load(broken / "checkpoints/last.pt", weights_only=False)["state"]["partial"]
    assert partial["batches"] == 9 and len(partial["ranks"]) == 2
    assert partial["ranks"][0]["draws"]["torch"].tolist() != partial["ranks"][1]["draws"]["torch"].tolist()
    resumed, _ = _run_ddp(tmp_path / "broken", [*overrides, "resume=auto"])
    assert resumed == whole  # every rank's step, weights and validation
