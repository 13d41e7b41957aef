"""Calibration: ECE/NLL/Brier, temperature scaling fitted on val only, and test.json's new keys."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inat.calibration import brier, ece, fit_temperature, nll, reliability_diagram


def calibrated_predictor(n: int, k: int, seed: int):
    """Probabilities whose top-1 confidence is exactly the chance of being right.

    The confidence c is uniform on [1/k, 1]; the predicted class is the true one with
    probability c, else another uniformly; the rest of the mass is spread evenly.
    """
    rng = np.random.default_rng(seed)
    conf = rng.uniform(1 / k, 1.0, n)
    pred = rng.integers(0, k, n)
    right = rng.uniform(size=n) < conf
    other = (pred + rng.integers(1, k, n)) % k
    labels = np.where(right, pred, other)
    probs = np.repeat(((1 - conf) / (k - 1))[:, None], k, axis=1)
    probs[np.arange(n), pred] = conf
    return probs, labels


def test_ece_of_a_perfectly_calibrated_predictor_is_about_zero():
    probs, labels = calibrated_predictor(200_000, 10, seed=0)
    assert ece(probs, labels) < 0.005
    # The same predictions, claimed more confidently than they are right, are miscalibrated.
    sharp = probs ** 3 / (probs ** 3).sum(1, keepdims=True)
    assert ece(sharp, labels) > 0.05


def test_ece_nll_brier_on_hand_worked_values():
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    labels = np.array([0, 1, 1, 0])
    # bins of 1/15: 0.8, 0.6, 0.7, 0.9 fall in four different bins, correct 1, 0, 1, 1
    assert ece(probs, labels) == pytest.approx((0.2 + 0.6 + 0.3 + 0.1) / 4)
    assert nll(probs, labels) == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.7, 0.9])))
    assert brier(probs, labels) == pytest.approx(np.mean([2 * 0.2 ** 2, 2 * 0.6 ** 2, 2 * 0.3 ** 2, 2 * 0.1 ** 2]))
    assert ece(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # confidence 1.0 lands in the last bin


def test_temperature_fitted_on_val_lowers_val_nll():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (2000,), generator=gen)
    x = torch.randn(2000, 5, generator=gen) + 2.0 * torch.nn.functional.one_hot(y, 5)
    # With unit-variance noise around a mean of 2 on the true class, the exact posterior's
    # logits are 2x; three times those is what an over-trained network's look like.
    overconfident = 3.0 * (2.0 * x)
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = nll(overconfident.softmax(1), y)
    after = nll((overconfident / t).softmax(1), y)
    assert after < before - 0.1
    assert (overconfident / t).argmax(1).equal(overconfident.argmax(1))  # accuracy is untouched
    assert fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)) == 1.0


def test_reliability_diagram_is_written(tmp_path):
    probs, labels = calibrated_predictor(2000, 4, seed=1)
    out = reliability_diagram({"raw": probs, "sharp": probs ** 2 / (probs ** 2).sum(1, keepdims=True)}, labels,
                              tmp_path / "reliability.png")
    assert out.is_file() and out.stat().st_size > 1000


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A scratch run of two epochs on tiny data, trained in-process."""
    from conftest import FAST, make_dataset
    from omegaconf import OmegaConf

    from inat.config import Config
    from inat.training import fit

    base = tmp_path_factory.mktemp("cal")
    root = make_dataset(base / "data", n_train=40)  # 24 validation images: enough for a temperature fit
    cfg = OmegaConf.structured(Config)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"data.root={root}", *FAST, "train.epochs=2",
                                                       f"data.cache_dir={base / 'cache'}"]))
    torch.set_num_threads(1)
    fit(cfg, base / "run")
    return root, base / "run" / "checkpoints" / "best.pt"


def test_test_mode_reports_calibration_recall_and_macro_f1(trained_run, tmp_path):
    from inat.checkpoint import load_checkpoint
    from inat.holdout import test_checkpoint

    root, ckpt = trained_run
    result = test_checkpoint(ckpt, tmp_path / "test", progress=False)
    cal = result["calibration"]
    # training fitted T on the validation split and stored it in the checkpoint
    assert cal["bins"] == 15 and cal["temperature"] > 0 and cal["temperature_source"] == "checkpoint"
    assert load_checkpoint(ckpt)["temperature"] == cal["temperature"]
    assert set(cal["before"]) == set(cal["after"]) == {"ece", "nll", "brier"}
    assert result["ece"] == cal["after"]["ece"] and (tmp_path / "test" / "reliability.png").is_file()
    assert set(result["per_class_recall"]) == set(result["classes"]) and 0 <= result["macro_f1"] <= 1
    assert result["per_class_recall"] == result["per_class_accuracy"]  # recall is the row-normalised diagonal
    assert result["top_k_accuracy"]["top1"] == pytest.approx(result["accuracy"]) and result["top_k_accuracy"]["top3"] == 1.0
    assert json.loads((tmp_path / "test" / "test.json").read_text())["macro_f1"] == result["macro_f1"]


def test_the_val_temperature_never_reads_the_test_folder(trained_run, tmp_path):
    """Fitting on val works with the test folder gone, and lowers (never raises) val NLL."""
    from inat.checkpoint import load_checkpoint
    from inat.holdout import checkpoint_or_val_temperature, validation_logits
    from inat.models import model_from_state

    root, ckpt = trained_run
    copy = tmp_path / "data"
    shutil.copytree(root / "train", copy / "train")  # no val/ (the test folder) at all
    state = load_checkpoint(ckpt)
    state["config"]["data"]["root"] = str(copy)
    state.pop("temperature")  # an older checkpoint without one: test mode fits T on val itself
    model = model_from_state(state)
    t, source = checkpoint_or_val_temperature(state, model, torch.device("cpu"))
    assert source.startswith("validation") and t > 0
    logits, labels = validation_logits(state, model, torch.device("cpu"))
    assert nll((logits / t).softmax(1), labels) <= nll(logits.softmax(1), labels) + 1e-9
    state["temperature"] = 1.7  # a checkpoint's own temperature wins
    assert checkpoint_or_val_temperature(state, model, torch.device("cpu")) == (1.7, "checkpoint")


def test_a_changed_train_folder_gives_no_temperature_not_a_traceback(trained_run, capsys):
    """The rebuilt validation split must hash to the run's; a mismatch is one sentence (it was a NameError)."""
    from inat.checkpoint import load_checkpoint
    from inat.errors import InatError
    from inat.holdout import checkpoint_or_val_temperature, validation_logits
    from inat.models import model_from_state

    _, ckpt = trained_run
    state = load_checkpoint(ckpt)
    state.pop("temperature")
    state["split_sha1"]["val"] = ["0" * 40] * len(state["split_sha1"]["val"])
    model = model_from_state(state)
    with pytest.raises(InatError, match="differs from the run's"):
        validation_logits(state, model, torch.device("cpu"))
    assert checkpoint_or_val_temperature(state, model, torch.device("cpu")) == (None, "none")
    assert "the training images changed since training" in capsys.readouterr().out


def test_class_scores_by_hand():
    from inat.holdout import class_scores

    confusion = np.array([[3, 1, 0], [0, 0, 2], [0, 0, 0]])  # class 2 has no test images, class 1 is never right
    s = class_scores(confusion, ["a", "b", "c"])
    assert s["per_class_recall"] == {"a": 0.75, "b": 0.0, "c": None}
    f1_a = 2 * 1.0 * 0.75 / 1.75
    assert s["per_class_f1"]["a"] == pytest.approx(f1_a) and s["per_class_f1"]["b"] == 0.0
    assert s["macro_f1"] == pytest.approx(f1_a / 2)


def test_predict_and_export_use_the_checkpoint_temperature(tmp_path):
    """predict divides by T unless predict.calibrated=false; the ONNX graph holds T and its metadata names it."""
    import onnx
    from test_export import make_checkpoint as export_checkpoint_file

    from conftest import make_dataset
    from inat.checkpoint import load_checkpoint, save_checkpoint
    from inat.export import export_checkpoint, run_onnx
    from inat.predict import predict_images

    data = make_dataset(tmp_path / "data", n_classes=3, n_train=2, n_test=1)
    plain = export_checkpoint_file(tmp_path / "plain.pt", ["class_0", "class_1", "class_2"], data)
    state = load_checkpoint(plain)
    state["temperature"] = 2.5
    save_checkpoint(state, tmp_path / "calibrated.pt")
    inputs = [data / "train"]
    raw = predict_images(plain, inputs, tmp_path / "p0", echo=False)
    scaled = predict_images(tmp_path / "calibrated.pt", inputs, tmp_path / "p1", echo=False)
    switched_off = predict_images(tmp_path / "calibrated.pt", inputs, tmp_path / "p2", echo=False, calibrated=False)
    assert raw.temperature is None and scaled.temperature == 2.5 and switched_off.temperature is None
    assert [r["probability"] for r in switched_off.records] == [r["probability"] for r in raw.records]
    assert [r["class"] for r in scaled.records] == [r["class"] for r in raw.records]
    assert all(s["probability"] < r["probability"] for s, r in zip(scaled.records, raw.records))  # T > 1 softens

    out_raw = export_checkpoint(plain, tmp_path / "e0", verify_images=2)
    out_cal = export_checkpoint(tmp_path / "calibrated.pt", tmp_path / "e1", verify_images=2)
    meta = {p.key: p.value for p in onnx.load(out_cal["path"]).metadata_props}
    assert meta["temperature"] == "2.5" and meta["calibrated"] == "true" and out_raw["metadata"]["calibrated"] == "false"
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert np.allclose(run_onnx(Path(out_cal["path"]), x) * 2.5, run_onnx(Path(out_raw["path"]), x), atol=1e-4)


def test_rescaled_probabilities_equal_softmax_of_scaled_logits():
    from inat.calibration import rescale_probs

    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 4
    probs = logits.softmax(1).numpy()
    assert np.allclose(rescale_probs(probs, 2.5), (logits / 2.5).softmax(1).numpy(), atol=1e-6)
    assert rescale_probs(probs, None) is probs


def test_report_shows_recall_macro_f1_and_ece_before_and_after(tmp_path):
    from inat.report.collect import Run
    from inat.report.sections import quality_section

    (tmp_path / "test").mkdir()
    probs, labels = calibrated_predictor(500, 3, seed=2)
    reliability_diagram({"raw": probs}, labels, tmp_path / "test" / "reliability.png")
    test = {"accuracy": 0.5, "per_class_recall": {"a": 0.5, "b": 0.25}, "per_class_f1": {"a": 0.4, "b": 0.3},
            "macro_f1": 0.35, "top_k_accuracy": {"top1": 0.5, "top3": 0.9},
            "calibration": {"bins": 15, "temperature": 1.8, "temperature_source": "checkpoint", "figure": "reliability.png",
                            "before": {"ece": 0.12, "nll": 1.2, "brier": 0.6},
                            "after": {"ece": 0.03, "nll": 1.0, "brier": 0.55}}}
    from inat.run_folder import RunRecord

    html = quality_section(Run(RunRecord(tmp_path, None, test=test)))
    for text in ("Macro-F1 <b>35.0%</b>", "top3 90.0%", "<b>12.0%</b> with the raw softmax", "<b>3.0%</b> after",
                 "T = 1.80", "Reliability diagram", "25.0%"):
        assert text in html, text
