"""An int8 copy of an exported ONNX model, accepted only if it is still accurate.

``+mode=export export.quantize=dynamic|static`` runs after the fp32 export has passed its
parity check. ONNX Runtime's quantization writes ``model.int8.onnx``: ``dynamic`` stores the
Conv and MatMul/Gemm weights in int8 and quantizes their inputs per batch at run time;
``static`` also fixes every activation's int8 range beforehand, from
``export.calibration_images`` seeded picks of the run's TRAINING split (never the validation
images the gate scores, never the test folder). Both models are then scored on the run's
validation split, rebuilt from the checkpoint and checked against its hashes, and timed on
the CPU. When the int8 accuracy is lower by more than ``export.max_drop`` the int8 file is
not kept (it was written under a temp name) and the command fails with the numbers.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from inat import choices
from inat.data.images import to_float
from inat.errors import InatError
from inat.models import ModelSpec
from inat.runs import atomic_path, usable_cpus
from inat.training.data import checkpoint_split
from inat.training.writer import environment

INT8_NAME = "model.int8.onnx"
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 16
SCORE_BATCH = 64
LATENCY_WARMUP, LATENCY_RUNS = 5, 30
# What each mode asks ONNX Runtime for; recorded in export.json as it was used.
SETTINGS = {
    "dynamic": {"weight_type": "QInt8", "per_channel": False},
    "static": {"format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
               "calibrate_method": "MinMax"},
}
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class GateRefused(InatError):
    """The int8 model lost more accuracy than allowed; ``record`` holds the measured numbers."""

    def __init__(self, sentence: str, record: Dict[str, Any]) -> None:
        super().__init__(sentence)
        self.record = record


class TrainingImages(CalibrationDataReader):
    """Feeds static quantization's calibration: normalised training-split images in small batches.

    ``paths`` are the files the batches came from, so what calibration read can be checked.
    """

    def __init__(self, x: np.ndarray, paths: Sequence[str], input_name: str) -> None:
        self.x, self.paths, self.input_name = x, list(paths), input_name  # x: (N, 3, S, S) float32
        self.rewind()

    def get_next(self) -> Dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = iter([{self.input_name: self.x[i:i + CALIBRATION_BATCH]}
                              for i in range(0, len(self.x), CALIBRATION_BATCH)])


def normalised(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, as export's parity check feeds the model."""
    return to_float(torch.from_numpy(np.ascontiguousarray(images)), spec.mean, spec.std).numpy()


def calibration_reader(data: Any, spec: ModelSpec, n: int, input_name: str) -> TrainingImages:
    """``n`` seeded picks (at most the split's size) from the training split of ``data`` (a TrainData)."""
    picks = np.sort(np.random.default_rng(CALIBRATION_SEED).permutation(data.train_idx)[:n])
    paths = [str(Path(data.folder.paths[i]).relative_to(data.root)) for i in picks]
    return TrainingImages(normalised(data.images[picks], spec), paths, input_name)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Silence ONNX Runtime's quantization logging to the root logger (which Hydra's job logging
    prints and writes to run.log): one INFO line per tensor, and a multi-line WARNING per
    integer shape tensor it leaves alone (EfficientNet-Lite's padding Slices). The gate, not
    the log, says whether the int8 model is good."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_file(fp32: Path, out: Path, mode: str, reader: TrainingImages | None) -> None:
    """Write the int8 model of ``fp32`` to ``out`` (after ONNX Runtime's recommended pre-processing),
    carrying the fp32 file's metadata plus ``quantize`` = ``mode``."""
    with tempfile.TemporaryDirectory(prefix="inat-quant-") as tmp, quiet_root_logger():
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))  # shape inference + graph fusions the quantizer expects
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=False)
        else:
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    source, proto = onnx.load(str(fp32)), onnx.load(str(out))
    del proto.metadata_props[:]
    for prop in [*source.metadata_props, onnx.StringStringEntryProto(key="quantize", value=mode)]:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(proto, str(out))


def quantized_ops(path: Path) -> Dict[str, Dict[str, int]]:
    """Which compute ops of the int8 graph run in int8 and which stay float, by op type.

    Dynamic quantization rewrites an op into an integer one (ConvInteger, MatMulInteger); static
    QDQ keeps the op and puts DequantizeLinear on its inputs (ONNX Runtime fuses the pair into
    an int8 kernel at load time).
    """
    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    int8: Dict[str, int] = {}
    left: Dict[str, int] = {}
    for node in graph.node:
        if node.op_type.endswith("Integer") or node.op_type.startswith("QLinear"):
            int8[node.op_type] = int8.get(node.op_type, 0) + 1
        elif node.op_type in COMPUTE_OPS:
            table = int8 if any(name in dequantized for name in node.input) else left
            table[node.op_type] = table.get(node.op_type, 0) + 1
    return {"int8": int8, "float": left}


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy(sess: ort.InferenceSession, images: np.ndarray, labels: np.ndarray, spec: ModelSpec) -> int:
    """Correct top-1 predictions of ``sess`` on (N, S, S, 3) uint8 ``images``, normalised batch by batch
    (a few hundred 224 px images in float32 would be gigabytes); a count, so two models compare exactly."""
    name = sess.get_inputs()[0].name
    predicted = np.concatenate([sess.run(None, {name: normalised(images[i:i + SCORE_BATCH], spec)})[0].argmax(1)
                                for i in range(0, len(images), SCORE_BATCH)])
    return int((predicted == labels).sum())


def latency_ms(sess: ort.InferenceSession, image: np.ndarray) -> float:
    """Median milliseconds of one batch-1 run, over LATENCY_RUNS runs after LATENCY_WARMUP."""
    feed = {sess.get_inputs()[0].name: image[None]}
    for _ in range(LATENCY_WARMUP):
        sess.run(None, feed)
    times: List[float] = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def cpu_label(threads: int) -> Dict[str, Any]:
    """The machine the latencies were measured on (training's environment record) and how they were taken."""
    machine = environment(torch.device("cpu"))
    return {"cpu": machine["cpu"], "cpu_count": machine["cpu_count"], "cpu_capability": machine["cpu_capability"],
            "threads": threads, "torch": machine["torch"], "onnxruntime": ort.__version__, "batch": 1,
            "statistic": "median", "runs": LATENCY_RUNS, "warmup": LATENCY_WARMUP}


def quantize_and_gate(fp32: Path, state: Dict[str, Any], spec: ModelSpec, *, mode: str, max_drop: float,
                      calibration_images: int, input_name: str) -> Dict[str, Any]:
    """Quantize ``fp32`` into ``model.int8.onnx`` beside it and keep it only if it passes the gate.

    Returns the ``quantize`` record of export.json. Raises GateRefused (an InatError, with the
    record) when the validation accuracy drops by more than ``max_drop``; the int8 file is
    then removed, the fp32 one stays.
    """
    if mode not in choices.QUANTIZE_MODES or mode == "none":
        raise InatError(f"Unknown export.quantize '{mode}': valid are {', '.join(choices.QUANTIZE_MODES)}.")
    final = Path(fp32).with_name(INT8_NAME)
    if final.is_file():
        final.unlink()  # an older export's int8 copy belongs to another fp32 file: refused or not, it goes
    sides = ("val", "train") if mode == "static" else ("val",)
    try:
        data = checkpoint_split(state, spec, "the int8 model cannot be calibrated or gated on it", sides=sides)
    except InatError as err:
        raise InatError(f"export.quantize scores the int8 model on the run's validation split, read from the "
                        f"checkpoint's data.root, and it cannot: {err}") from err
    val_images, y_val = np.asarray(data.images[data.val_idx]), np.asarray(data.labels[data.val_idx])
    reader = calibration_reader(data, spec, int(calibration_images), input_name) if mode == "static" else None
    threads = usable_cpus()
    with atomic_path(final) as tmp:
        quantize_file(Path(fp32), tmp, mode, reader)
        sessions = {"fp32": session(fp32, threads), "int8": session(tmp, threads)}
        correct = {k: accuracy(s, val_images, y_val, spec) for k, s in sessions.items()}
        n = len(y_val)
        record: Dict[str, Any] = {
            "mode": mode, "settings": SETTINGS[mode], "ops": quantized_ops(tmp), "max_drop": float(max_drop),
            "val": {"n": n, "fp32_accuracy": correct["fp32"] / n, "int8_accuracy": correct["int8"] / n,
                    "drop": (correct["fp32"] - correct["int8"]) / n,
                    "split": "given val/" if data.given_val else "carved from train/ (the run's split)"},
            "bytes": {"fp32": Path(fp32).stat().st_size, "int8": tmp.stat().st_size},
            "latency_ms": {k: latency_ms(s, normalised(val_images[:1], spec)[0]) for k, s in sessions.items()},
            "latency_machine": cpu_label(threads),
            "calibration": None if reader is None else {"split": "train", "n": len(reader.paths),
                                                        "paths": reader.paths},
        }
        val = record["val"]
        if val["drop"] > max_drop:
            record.update(accepted=False, path=None)
            raise GateRefused(
                f"The int8 ({mode}) model scores {val['int8_accuracy']:.1%} on the {n} validation images against "
                f"{val['fp32_accuracy']:.1%} for fp32, a drop of {100 * val['drop']:.1f} points, above export.max_drop="
                f"{max_drop:g}, so {INT8_NAME} was not kept (the fp32 {Path(fp32).name} is).", record)
    record.update(accepted=True, path=str(final.resolve()))
    return record


def describe(record: Dict[str, Any]) -> List[str]:
    """The lines ``+mode=export`` prints for an accepted int8 model."""
    val, size, ms, machine = record["val"], record["bytes"], record["latency_ms"], record["latency_machine"]
    ops = ", ".join(f"{op} x{k}" for op, k in record["ops"]["int8"].items()) or "nothing"
    left = ", ".join(f"{op} x{k}" for op, k in record["ops"]["float"].items())
    source = (f"activation ranges from {record['calibration']['n']} training-split images"
              if record["calibration"] else "activations quantized per batch at run time")
    return [
        f"int8 ({record['mode']}, {source}): int8 ops {ops}" + (f"; still float: {left}" if left else ""),
        f"validation accuracy on {val['n']} images: fp32 {val['fp32_accuracy']:.2%}, int8 {val['int8_accuracy']:.2%}, "
        f"drop {100 * val['drop']:.2f} points (export.max_drop={record['max_drop']:g})",
        f"size: fp32 {size['fp32']:,} bytes, int8 {size['int8']:,} bytes (int8 is {size['int8'] / size['fp32']:.2f}x the fp32 size)",
        f"CPU latency per image (onnxruntime, batch 1, median of {machine['runs']} after {machine['warmup']} warm-up, "
        f"{machine['cpu']}, {machine['cpu_capability']}, {machine['threads']} threads): fp32 {ms['fp32']:.3f} ms, "
        f"int8 {ms['int8']:.3f} ms",
    ]
