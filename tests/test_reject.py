"""Saying "unknown": the risk-coverage curve, the threshold chosen on validation, and where it is applied.

Constructed probabilities check ``risk_coverage`` and ``choose_threshold`` to exact values; a
tiny real run checks that training's end chooses the threshold on the validation split (the
calibrated probabilities without the flip) and that predict, test mode, detect's namer and
the report use it; a held-out class checks that the threshold rejects most images of a class
the model never saw and keeps most images of the classes it knows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, make_dataset, run_cli
from inat.calibration import (MIN_CALIBRATION_IMAGES, apply_temperature, choose_threshold, coverage_at,
                              risk_coverage)
from inat.checkpoint import load_checkpoint, save_checkpoint
from inat.errors import InatError

# Five images, top-1 confidence and whether the top class is right:
# 0.9 right, 0.8 right, 0.8 wrong (a tie), 0.6 right, 0.7 wrong (its top class is class 1).
PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
LABELS = np.array([0, 0, 1, 0, 0])


def test_risk_coverage_by_hand():
    curve = risk_coverage(PROBS, LABELS)
    # thresholds 0.9 / 0.8 / 0.7 / 0.6 keep 1 / 3 (the tie together) / 4 / 5 images, right 1 / 2 / 2 / 3
    assert curve["n"] == 5 and curve["threshold"] == [0.9, 0.8, 0.7, 0.6]
    assert curve["coverage"] == [0.2, 0.6, 0.8, 1.0]
    assert curve["precision"] == [1.0, 0.666667, 0.5, 0.6]
    # the area under risk against coverage: 0.2 * 0 + 0.4 * 1/3 + 0.2 * 1/2 + 0.2 * 2/5
    assert curve["aurc"] == pytest.approx(0.4 / 3 + 0.1 + 0.08, abs=1e-6)
    assert risk_coverage(np.zeros((0, 2)), [])["aurc"] is None


def test_risk_coverage_is_thinned_to_the_points_asked():
    probs = np.linspace(0.999, 0.5, 500)
    probs = np.stack([probs, 1 - probs], 1)
    curve = risk_coverage(probs, np.zeros(500, dtype=int), points=5)
    assert curve["coverage"] == [0.002, 0.252, 0.502, 0.75, 1.0] and curve["precision"] == [1.0] * 5
    assert curve["threshold"][0] == 0.999 and curve["threshold"][-1] == 0.5 and curve["aurc"] == 0.0


def test_choose_threshold_by_hand():
    probs, labels = np.tile(PROBS, (4, 1)), np.tile(LABELS, 4)  # 20 images: the same groups, four times larger
    low = choose_threshold(probs, labels, 0.6)
    # precision is 1, 2/3, 1/2, 3/5 from the highest threshold down: 0.6 is reached again at full coverage
    assert (low.threshold, low.coverage, low.precision, low.n) == (0.6, 1.0, 0.6, 20)
    high = choose_threshold(probs, labels, 0.75)
    assert (high.threshold, high.coverage, high.precision) == (0.9, 0.2, 1.0) and "4 of 20" in high.note
    wrong_first = np.tile(LABELS, 4).copy()
    wrong_first[::5] = 1  # the most confident image of each copy is now wrong
    none = choose_threshold(probs, wrong_first, 0.95)
    assert none.threshold is None and none.coverage is None and "no threshold reaches precision 0.950" in none.note
    few = choose_threshold(PROBS, LABELS, 0.5)
    assert few.threshold is None and f"fewer than {MIN_CALIBRATION_IMAGES}" in few.note
    assert coverage_at(PROBS, LABELS, 0.8) == (0.6, pytest.approx(2 / 3))
    assert coverage_at(PROBS, LABELS, 0.95) == (0.0, None)


# --------------------------------------------------------------------------- a tiny real run

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A scratch run of a few epochs (24 validation images, the flip at test time on by default)."""
    from omegaconf import OmegaConf

    from inat.config import Config
    from inat.training import fit

    base = tmp_path_factory.mktemp("reject")
    root = make_dataset(base / "data", n_train=40)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(
        [f"data.root={root}", *FAST, "train.epochs=4", f"data.cache_dir={base / 'cache'}", "predict.target_precision=0.9"]))
    assert cfg.aug.tta_flip  # the threshold must still be chosen without the flip, as predict scores
    torch.set_num_threads(1)
    fit(cfg, base / "run")
    return root, base / "run"


def test_threshold_is_chosen_on_val_and_applied_in_predict(trained_run, tmp_path, capsys):
    from inat.holdout import validation_logits
    from inat.modes.predict import run as predict_mode
    from inat.predictor import Predictor
    from test_predict import predict_cfg

    root, run = trained_run
    ckpt = run / "checkpoints" / "best.pt"
    state = load_checkpoint(ckpt)
    rejection = state["rejection"]
    assert rejection["target_precision"] == 0.9 and rejection["tta_flip"] is False and rejection["n_val"] == 24
    threshold = state["reject_threshold"]
    assert threshold is not None, rejection["note"]
    # Recomputed from the validation split alone (rebuilt from train/), without the flip, calibrated.
    predictor = Predictor.from_checkpoint(ckpt)
    logits, labels = validation_logits(state, predictor.model, predictor.device, tta=False)
    val = choose_threshold(apply_temperature(logits, state["temperature"]).softmax(1), labels, 0.9)
    assert val.threshold == pytest.approx(threshold, abs=1e-6) and val.coverage == rejection["val_coverage"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reject_threshold"] == threshold and summary["rejection"]["val_coverage"] == val.coverage
    assert load_checkpoint(run / "checkpoints" / "last.pt")["reject_threshold"] == threshold
    assert predictor.reject_threshold == threshold

    capsys.readouterr()
    out = tmp_path / "predict"
    predict_mode(predict_cfg(ckpt, [root / "val"], reject=True), out)
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    unknown = [r for r in records if r["unknown"]]
    assert all(r["class"] == "unknown" and r["guess"] == r["top_k"][0]["class"] for r in unknown)
    assert all(r["probability"] < threshold + 1e-6 for r in unknown)
    assert all(r["probability"] >= threshold - 1e-6 and "guess" not in r for r in records if not r["unknown"])
    assert f"{len(unknown)} unknown (below the threshold {threshold:.3f})" in printed
    for r in unknown:
        assert f"{r['path']}: unknown (top guess {r['guess']} {r['probability']:.3f})" in printed
    # the same images without reject: the same top classes, no unknown key
    predict_mode(predict_cfg(ckpt, [root / "val"]), tmp_path / "plain")
    plain = [json.loads(line) for line in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    assert [p["class"] for p in plain] == [r.get("guess", r["class"]) for r in records]
    assert not any("unknown" in p for p in plain)


def test_test_json_holds_the_curve_and_the_coverage_at_the_val_threshold(trained_run, tmp_path):
    from inat.holdout import test_checkpoint
    from inat.predictor import Predictor

    root, run = trained_run
    ckpt = run / "checkpoints" / "best.pt"
    result = test_checkpoint(ckpt, tmp_path / "test", progress=False)
    rejection = json.loads((tmp_path / "test" / "test.json").read_text())["rejection"]
    state = load_checkpoint(ckpt)
    assert rejection["threshold"] == state["reject_threshold"] and rejection["tta_flip"] is False
    assert rejection["curve"]["n"] == result["n"] and rejection["curve"]["coverage"][-1] == 1.0
    # what predict would answer on the test images: the calibrated probabilities without the flip
    predictor = Predictor.from_checkpoint(ckpt)
    paths = sorted((root / "val").rglob("*.png"))
    probs = predictor.probabilities(predictor.decode(paths), tta=False)
    labels = np.array([predictor.classes.index(p.parent.name) for p in paths])
    coverage, precision = coverage_at(probs, labels, state["reject_threshold"])
    assert rejection["coverage"] == pytest.approx(coverage) and rejection["precision"] == pytest.approx(precision)
    assert rejection["curve"]["precision"][-1] == pytest.approx(float((probs.argmax(1).numpy() == labels).mean()),
                                                              abs=1e-6)


def test_a_checkpoint_without_a_threshold_still_tests_and_reject_is_one_sentence(trained_run, tmp_path):
    from inat.holdout import test_checkpoint
    from inat.predict import predict_images

    root, run = trained_run
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    del state["reject_threshold"], state["rejection"]  # a checkpoint from before rejection
    old = tmp_path / "old.pt"
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, old)
    rejection = test_checkpoint(old, tmp_path / "test", progress=False)["rejection"]
    assert rejection["threshold"] is None and "stores no rejection threshold" in rejection["note"]
    assert rejection["curve"]["n"] == 12 and "coverage" not in rejection
    with pytest.raises(InatError, match="stores no rejection threshold"):
        predict_images(old, [root / "val"], tmp_path / "p", echo=False, reject=True)
    assert not (tmp_path / "p").exists()  # refused before anything was written
    with pytest.raises(InatError, match="drop predict.calibrated=false"):
        predict_images(run / "checkpoints" / "best.pt", [root / "val"], tmp_path / "q", echo=False, reject=True,
                       calibrated=False)
    proc = run_cli(["+mode=predict", f"ckpt={old}", f"predict.inputs=[{root / 'val'}]", "predict.reject=true",
                    f"hydra.run.dir={tmp_path / 'cli'}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stores no rejection threshold" in proc.stderr + proc.stdout


def test_detects_namer_says_unknown_below_the_threshold(trained_run, tmp_path):
    from inat.detect.app import SpeciesNamer, _event

    root, run = trained_run
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    image = np.asarray(Image.open(next((root / "val" / "class_0").glob("*.png"))).convert("RGB"))
    boxes = [(0, 0, 40, 40), (0, 0, 20, 20)]
    plain = SpeciesNamer(str(run / "checkpoints" / "best.pt")).name(image, boxes)
    for threshold, unknown in ((1.01, True), (0.0, False)):  # above every probability / below every one
        state["reject_threshold"] = threshold
        ckpt = tmp_path / f"t{threshold}.pt"
        save_checkpoint({k: v for k, v in state.items() if k != "format"}, ckpt)
        named = SpeciesNamer(str(ckpt), reject=True).name(image, boxes)
        assert [s.name == "unknown" for s in named] == [unknown] * 2
        assert [s.guess or s.name for s in named] == [p.name for p in plain]
        assert [s.score for s in named] == [p.score for p in plain]
    event = _event(type("F", (), {"source": "x.jpg", "index": 0, "video_seconds": None})(),
                   type("D", (), {"name": "dog", "score": 0.9, "box": (0, 0, 1, 1)})(), "detection",
                   type("T", (), {"track_id": 1, "frames": 1})(), SpeciesNamer(str(tmp_path / "t1.01.pt"),
                                                                                reject=True).name(image, boxes[:1])[0])
    assert event["species"] == "unknown" and event["species_guess"] == plain[0].name
    del state["reject_threshold"], state["rejection"]
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, tmp_path / "old.pt")
    with pytest.raises(InatError, match="stores no rejection threshold"):
        SpeciesNamer(str(tmp_path / "old.pt"), reject=True)


def test_report_shows_the_curve_and_the_coverage_at_the_threshold(trained_run, tmp_path):
    from inat.holdout import test_checkpoint
    from inat.report.collect import Run
    from inat.report.rejection import rejection_section
    from inat.run_folder import RunRecord

    _, run = trained_run
    test = test_checkpoint(run / "checkpoints" / "best.pt", tmp_path / "test", progress=False)
    rejection = test["rejection"]
    html = rejection_section([Run(RunRecord(tmp_path, None, test=test))])
    assert 'id="rejection"' in html and html.count("<img ") == 1 and "data:image/png;base64," in html
    assert f"{rejection['threshold']:.4f}" in html and f"{100 * rejection['coverage']:.1f}%" in html
    assert f"{100 * rejection['val_coverage']:.1f}%" in html
    empty = rejection_section([Run(RunRecord(tmp_path, None, test={"accuracy": 0.5}))])
    assert "No test.json with a rejection section" in empty and "<img" not in empty


# --------------------------------------------------------------------------- a class the model never saw

KNOWN = {"red": (210, 30, 30), "green": (30, 210, 30), "blue": (30, 30, 210)}
NEVER_SEEN = (100, 100, 100)  # grey: no known class's colour; the centre of the three
MIN_REJECTED = 0.8  # of the never-seen class's images answered unknown
MIN_KEPT = 0.9  # of new images of the known classes kept (not unknown)


def colour_images(folder: Path, colour, n: int, seed: int, size: int = 40) -> Path:
    """``n`` PNGs of one colour at a random brightness (75-100%) with strong per-pixel noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = np.asarray(colour, dtype=np.float32) * rng.uniform(0.75, 1.0) + rng.normal(0, 70, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{seed}_{i}.png")
    return folder


def test_a_class_never_seen_is_mostly_unknown_and_known_classes_mostly_kept(tmp_path):
    """Three colours trained on; grey images, a class the model never saw, must mostly be rejected.

    300 training images per class make the first epoch already a trained model (best.pt is the
    first epoch at the best validation accuracy, which these classes reach at once); a
    constant learning rate without warm-up gives that epoch its full steps.
    """
    from omegaconf import OmegaConf

    from inat.config import Config
    from inat.predict import predict_images
    from inat.training import fit

    root = tmp_path / "data"
    for k, (name, colour) in enumerate(KNOWN.items()):
        colour_images(root / "train" / name, colour, 300, seed=100 + k)
        colour_images(root / "val" / name, colour, 10, seed=200 + k)  # the test set: new images of known classes
    never_seen = colour_images(tmp_path / "grey", NEVER_SEEN, 20, seed=400)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(
        [f"data.root={root}", *FAST, "train.epochs=3", "optim.schedule=constant", "optim.warmup_epochs=0",
         f"data.cache_dir={tmp_path / 'cache'}"]))
    torch.set_num_threads(1)
    fit(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert load_checkpoint(ckpt)["reject_threshold"] is not None
    known = predict_images(ckpt, [root / "val"], tmp_path / "known", echo=False, reject=True, workers=1)
    unseen = predict_images(ckpt, [never_seen], tmp_path / "unseen", echo=False, reject=True, workers=1)
    kept = 1 - known.unknown / len(known.records)
    rejected = unseen.unknown / len(unseen.records)
    print(f"never-seen class: {rejected:.0%} rejected; known classes: {kept:.0%} kept")
    assert rejected >= MIN_REJECTED, f"only {rejected:.0%} of the never-seen class rejected"
    assert kept >= MIN_KEPT, f"only {kept:.0%} of the known classes kept"
    right = [r for r in known.records if not r["unknown"] and r["class"] == Path(r["path"]).parent.name]
    assert len(right) >= MIN_KEPT * len(known.records)  # what is kept is also named right
