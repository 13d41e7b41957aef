"""The held-out score: a checkpoint scored on the test folder once, behind the leakage guard.

Named apart from validation (``training.sources``' ``evaluate``), which never sees this
folder. ``test_checkpoint`` (what ``+mode=test ckpt=PATH`` and the default job call) rebuilds the model from the checkpoint's own config, decodes the
test folder with the model's preprocessing, refuses to score if any test image is
byte-identical to an image the run trained or validated on, and writes ``test.json``
with accuracy, top-k, per-class recall and F1, macro-F1, and calibration (ECE, NLL, Brier
before and after temperature scaling, a reliability diagram in ``reliability.png``). The
temperature is the checkpoint's; a checkpoint without one gets it fitted here on the run's
validation split (rebuilt from train/ and checked against the checkpoint's hashes), never
on the test folder. ``rejection`` holds the risk-coverage curve of the calibrated top-1
probability and what the threshold chosen on validation keeps of the test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from inat.calibration import (ECE_BINS, REJECTION_KEY, TEMPERATURE_KEY, TEMPERATURE_NOTE_KEY, apply_temperature,
                              calibration_metrics, checkpoint_temperature, checkpoint_threshold, choose_temperature,
                              coverage_at, reliability_diagram, risk_coverage)
from inat.data.dataset import dataset_root
from inat.data.testset import check_leakage, read_test_set  # noqa: F401 - check_leakage re-exported
from inat.errors import InatError
from inat.predictor import Predictor
from inat.run_folder import RELIABILITY, TEST
from inat.runs import write_json
from inat.training.data import checkpoint_split


def class_scores(confusion: np.ndarray, classes: List[str]) -> Dict[str, Any]:
    """Per-class recall and F1, and macro-F1 (the unweighted mean over classes with test images).

    Rows of ``confusion`` are true classes. A class with no test images has no recall and no
    F1 (None) and is left out of the macro mean; one never predicted has precision 0.
    """
    tp = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(1), confusion.sum(0)
    recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    f1 = np.where(support > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), np.nan)
    f1 = np.where((support > 0) & (precision + recall == 0), 0.0, f1)

    def as_dict(values: np.ndarray) -> Dict[str, Optional[float]]:
        return {c: (None if np.isnan(x) else float(x)) for c, x in zip(classes, values)}

    return {"per_class_recall": as_dict(recall), "per_class_f1": as_dict(f1),
            "macro_f1": float(np.nanmean(f1)) if (support > 0).any() else None}


def top_k_accuracy(logits: torch.Tensor, labels: np.ndarray, ks: Tuple[int, ...] = (1, 3, 5)) -> Dict[str, float]:
    """``{"top1": ..., "top3": ...}`` for each k up to the class count."""
    y = torch.as_tensor(labels)[:, None]
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    return {f"top{k}": float((top[:, :k] == y).any(1).float().mean()) for k in ks if k <= logits.shape[1]}


def validation_logits(state: Dict[str, Any], model: torch.nn.Module, device: torch.device,
                      progress: bool = False, precision: str = "auto",
                      tta: Optional[bool] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """Logits and labels of the run's validation split, rebuilt from train/ (never the test folder).

    ``tta`` None scores with the run's ``aug.tta_flip`` (as test mode does); False without the flip.

    The split is recomputed from the checkpoint's config (stratified, seeded) and must hash
    to the images the run validated on; otherwise InatError, since a temperature fitted on
    other images would not be the run's.
    """
    predictor = Predictor.from_state(state, model=model, device=device, precision=precision)
    data = checkpoint_split(state, predictor.spec, "no temperature can be fitted", progress=progress)
    cfg = OmegaConf.create(state["config"])
    logits = predictor.logits(data.images[data.val_idx], tta=tta, batch_size=int(cfg.train.eval_batch_size))
    return logits, data.labels[data.val_idx]


def checkpoint_or_val_temperature(state: Dict[str, Any], model: torch.nn.Module, device: torch.device,
                                  precision: str = "auto") -> Tuple[Optional[float], str]:
    """``(temperature, where it came from)``: the checkpoint's, else fitted on the validation split.

    None when training decided on the raw softmax (the source is its note: refitting would
    only repeat the decision), or when no fit is possible or trusted (the train folder is
    gone, or ``choose_temperature``'s rule refuses, which it says once): test mode then
    reports the uncalibrated numbers only.
    """
    saved = checkpoint_temperature(state)
    if saved is not None:
        return saved, "checkpoint"
    if TEMPERATURE_KEY in state:
        return None, str(state.get(TEMPERATURE_NOTE_KEY) or "none")
    try:
        logits, labels = validation_logits(state, model, device, precision=precision)
    except (InatError, OSError) as err:
        print(f"no temperature: the checkpoint has none and the validation split is unavailable ({err})", flush=True)
        return None, "none"
    choice = choose_temperature(logits, labels)
    if choice.temperature is None:
        print(choice.note, flush=True)
        return None, "none"
    return choice.temperature, "validation split (fitted by test mode)"


def test_checkpoint(ckpt_path: str | Path, out_dir: Path, data_root: Optional[str] = None,
                    batch_size: int = 256, progress: bool = True, precision: str = "auto",
                    test_manifest: Optional[str] = None) -> Dict[str, Any]:
    """Score ``ckpt_path`` on the test folder of ``data_root`` (default: the run's root), or on
    the test rows of the run's manifest, or on ``test_manifest`` when given.

    ``precision`` is this process's policy (``train.precision`` of the command, ``auto`` by
    default), not the one the checkpoint was trained under: another machine may lack it.
    The test folder is read only here, through ``read_test_set`` (the guard and the leak check).
    """
    predictor = Predictor.from_checkpoint(ckpt_path, precision=precision, announce=True)
    state, classes, spec = predictor.state, predictor.classes, predictor.spec
    cfg = OmegaConf.create(state["config"])
    root = Path(data_root) if data_root else dataset_root(cfg.data, fetch=False)
    folder, cache = read_test_set(state, root, int(spec.input_size), purpose="test mode", interpolation=spec.interpolation,
                                  crop_pct=float(spec.crop_pct), cache_dir=cfg.data.cache_dir, progress=progress,
                                  test_manifest=test_manifest)
    logits = predictor.logits(cache.images, batch_size=batch_size, progress="test" if progress else None)
    y = np.asarray(folder.labels)
    pred = logits.argmax(1).numpy()
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    per_class = {c: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
                 for i, c in enumerate(classes)}
    result = {"accuracy": float((pred == y).mean()), "n": int(len(y)), "per_class_accuracy": per_class,
              "confusion_matrix": confusion.tolist(), "classes": classes, "ckpt": str(Path(ckpt_path).resolve()),
              "data_root": str(root), "tta_flip": predictor.tta_flip,
              "loss": float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)))}
    result["top_k_accuracy"] = top_k_accuracy(logits, y)
    result.update(class_scores(confusion, classes))
    temperature = checkpoint_or_val_temperature(state, predictor.model, predictor.device, precision)
    result.update(calibration_section(logits, y, *temperature, Path(out_dir)))
    # The threshold was chosen on logits without the flip (what predict computes by default).
    plain = predictor.logits(cache.images, tta=False, batch_size=batch_size) if predictor.tta_flip else logits
    result[REJECTION_KEY] = rejection_section(state, plain, y, temperature[0])
    write_json(Path(out_dir) / TEST, result)
    return result


def calibration_section(logits: torch.Tensor, labels: np.ndarray, temperature: Optional[float], source: str,
                        out_dir: Path) -> Dict[str, Any]:
    """test.json's calibration keys and ``reliability.png``: ECE/NLL/Brier of the probabilities
    inat reports (calibrated when a temperature exists) plus the before/after pair."""
    before = calibration_metrics(logits, labels)
    after = calibration_metrics(logits, labels, temperature) if temperature is not None else None
    curves = {"raw softmax": logits.double().softmax(1)}
    if temperature is not None:
        curves[f"T = {temperature:.2f}"] = (logits.double() / temperature).softmax(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    reliability_diagram(curves, labels, out_dir / RELIABILITY, title="Test reliability")
    return {**(after or before), "calibration": {"bins": ECE_BINS, "temperature": temperature, "temperature_source": source,
                                                 "before": before, "after": after, "figure": RELIABILITY}}


def rejection_section(state: Dict[str, Any], logits: torch.Tensor, labels: np.ndarray,
                      temperature: Optional[float]) -> Dict[str, Any]:
    """test.json's ``rejection``: the risk-coverage curve of the calibrated top-1 probability on the
    test set, and the coverage and precision there at the threshold chosen on validation.

    ``logits`` are without the flip, as the threshold was chosen; ``temperature`` is the one
    test mode settled on. A checkpoint without a threshold still gets the curve, and the
    section says why there is no threshold.
    """
    probs = apply_temperature(logits, temperature).softmax(dim=1)  # Predictor.probabilities_of's arithmetic
    stored = state.get(REJECTION_KEY) or {}
    threshold = checkpoint_threshold(state)
    section = {"curve": risk_coverage(probs, labels), "temperature": temperature, "tta_flip": False,
               "threshold": threshold, "target_precision": stored.get("target_precision"),
               "val_coverage": stored.get("val_coverage"), "val_precision": stored.get("val_precision")}
    if threshold is None:
        section["note"] = stored.get("note") or "the checkpoint stores no rejection threshold (trained before them)"
        return section
    coverage, precision = coverage_at(probs, labels, threshold)
    section.update(coverage=coverage, precision=precision,
                   note=f"at the validation threshold {threshold:.4f}: {coverage:.1%} of the test images kept, "
                        f"precision {'-' if precision is None else f'{precision:.1%}'}")
    return section
