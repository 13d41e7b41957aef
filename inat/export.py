"""Export mode: a checkpoint to ONNX (or TorchScript), verified against PyTorch before it counts.

``+mode=export ckpt=PATH [export.format=onnx|torchscript]`` rebuilds the model from the
checkpoint in fp32 eval mode on the CPU, exports it with a dynamic batch dimension and the
preprocessing constants (input size, mean, std, interpolation, crop, classes) stored in the
file, then runs the exported file on a few images (from the run's train folder when it is
there, else seeded random ones) at a batch size other than the traced one and compares its
logits with PyTorch's. The file is written under a temp name and renamed only after the check
passes, so a failed export leaves nothing behind. ``export.json`` records the result.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

import inat
from inat import choices
from inat.calibration import apply_temperature
from inat.data.folder import IMAGE_EXTENSIONS
from inat.data.images import to_float
from inat.errors import InatError
from inat.inference import Precision, Preprocess
from inat.models import ModelSpec
from inat.predictor import Predictor
from inat.run_folder import EXPORT
from inat.runs import atomic_path, write_json

FORMATS = dict(zip(choices.EXPORT_FORMATS, ("model.onnx", "model.torchscript.pt")))
ONNX_EXPORTERS = choices.ONNX_EXPORTERS
INPUT_NAME, OUTPUT_NAME = "input", "logits"
TRACE_BATCH = 2  # the parity check runs another batch size, which proves the batch axis is dynamic
VERIFY_SEED = 0


def preprocessing_metadata(spec: ModelSpec, classes: List[str], model_name: str) -> Dict[str, str]:
    """The string key/value pairs a consumer needs to feed the exported model without inat.

    Values are JSON where they are lists, so any ONNX runtime can parse them. The recipe is
    the one ``inat.data.images`` applies: RGB, resize the shorter side to ``input_size /
    crop_pct`` with ``interpolation``, centre-crop ``input_size``, scale to [0, 1], subtract
    ``mean``, divide by ``std``, NCHW.
    """
    return {
        "inat_version": inat.__version__,
        "model": model_name,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW float32 RGB",
        "input_size": str(int(spec.input_size)),
        "mean": json.dumps([float(v) for v in spec.mean]),
        "std": json.dumps([float(v) for v in spec.std]),
        "interpolation": spec.interpolation,
        "crop_pct": str(float(spec.crop_pct)),
        "scale": "1/255 then (x - mean) / std",
        "classes": json.dumps(list(classes)),
    }


def verification_images(data_root: str | None, preprocess: Preprocess, n: int) -> Tuple[np.ndarray, str]:
    """``((n, S, S, 3) uint8, source)``: seeded picks from ``<data_root>/train``, else random pixels.

    Real photos exercise the value ranges the model will see in use, which random noise does
    not; the test folder is never read, so exporting cannot touch held-out data. Files are
    decoded with the checkpoint's ``preprocess``.
    """
    size = int(preprocess.size)
    train = Path(data_root) / "train" if data_root else None
    if train is not None and train.is_dir():
        files = sorted(p for p in train.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        order = np.random.default_rng(VERIFY_SEED).permutation(len(files))
        arrays = []
        for i in order:
            try:
                arrays.append(preprocess.file(files[i]))
            except InatError:
                continue  # a bad training file says nothing about the export; take the next one
            if len(arrays) == n:
                break
        if len(arrays) == n:
            return np.stack(arrays), f"{train} ({n} seeded picks)"
    rng = np.random.default_rng(VERIFY_SEED)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8), "random pixels"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str,
                metadata: Dict[str, str]) -> int:
    """Write ``model`` to ONNX at ``path`` with a dynamic batch axis and ``metadata``; returns the opset used.

    ``legacy`` (torch.onnx's TorchScript-based exporter) is the default: in torch 2.14 it
    takes seconds where the torch.export-based ``dynamo`` exporter takes 40 s or more on two
    CPUs, needs the onnxscript package, and may raise the opset (it cannot write Pad at
    opset 17). Both matched PyTorch to 2e-6 on the scratch CNN and EfficientNet-Lite0.
    """
    import onnx

    if exporter not in ONNX_EXPORTERS:
        raise InatError(f"Unknown export.onnx_exporter '{exporter}': valid are {', '.join(ONNX_EXPORTERS)}.")
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=int(opset))
    with warnings.catch_warnings():
        # the legacy exporter warns that it is deprecated on every call; the choice is deliberate
        warnings.simplefilter("ignore", DeprecationWarning)
        if exporter == "legacy":
            torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **common)
        else:
            try:
                import onnxscript  # noqa: F401
            except ModuleNotFoundError as err:
                raise InatError("export.onnx_exporter=dynamo needs the onnxscript package (pip install onnxscript); "
                                "the default export.onnx_exporter=legacy does not.") from err
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), **common)
            program.save(str(path))
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime on the CPU for a (B, 3, S, S) float32 batch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: Dict[str, str]) -> None:
    """Trace ``model`` and save it with the metadata as the extra file ``inat.json``."""
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream (FutureWarning on every call) but still works in 2.14
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"inat.json": json.dumps(metadata)})


def run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits from the saved TorchScript file (loaded afresh, as a user would) for a float32 batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(torch.from_numpy(x)).numpy()


class TemperatureScaled(nn.Module):
    """``model(x) / T``: the checkpoint's temperature inside the exported graph, so a plain
    softmax of the output is the calibrated probability."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, classes)
        return self.model(x) / self.temperature


def export_checkpoint(ckpt: str | os.PathLike, out_dir: Path, *, fmt: str = "onnx", verify_images: int = 8,
                      opset: int = 17, onnx_exporter: str = "legacy", tolerance: float = 1e-3,
                      calibrated: bool = True, quantize: str = "none", max_drop: float = 0.01,
                      calibration_images: int = 64) -> Dict[str, Any]:
    """Export ``ckpt`` into ``out_dir`` as ``fmt``, verify parity, write ``export.json``; returns its dict.

    The model runs in fp32 eval mode on the CPU. The parity check feeds the exported file and
    PyTorch the same normalised images (all at once, then the first alone, so two batch sizes
    other than the traced one) and fails with InatError when the max absolute logit
    difference exceeds ``tolerance``; the temp file is removed then, and on any other error.
    With ``calibrated`` and a checkpoint temperature T the graph outputs ``logits / T``
    (metadata ``temperature`` = T, ``calibrated`` = true); otherwise the raw logits, with the
    checkpoint's T (if any) still in the metadata for consumers that scale themselves.
    With ``quantize`` (dynamic or static) the verified ONNX file then gets an int8 copy, kept
    only if its validation accuracy is within ``max_drop`` of fp32's (``inat.quantize``);
    export.json's ``quantize`` holds the numbers either way.
    """
    if fmt not in FORMATS:
        raise InatError(f"Unknown export.format '{fmt}': valid are {', '.join(FORMATS)}.")
    if quantize not in choices.QUANTIZE_MODES:
        raise InatError(f"Unknown export.quantize '{quantize}': valid are {', '.join(choices.QUANTIZE_MODES)}.")
    if quantize != "none" and fmt != "onnx":
        raise InatError(f"export.quantize={quantize} quantizes an ONNX model; use export.format=onnx (got {fmt}).")
    if verify_images < 1:
        raise InatError(f"export.verify_images must be at least 1 (got {verify_images}).")
    # On the CPU in fp32 whatever the machine has: the exported graph computes in fp32, and the
    # parity reference must be the same computation.
    fp32 = Precision("32", "export parity: the exported graph computes in fp32")
    predictor = Predictor.from_checkpoint(ckpt, precision=fp32, device="cpu", calibrated=calibrated)
    spec, classes, config = predictor.spec, predictor.classes, predictor.config
    model = predictor.model.float()
    model_name = str(config.get("model", {}).get("name", spec.name))
    metadata = preprocessing_metadata(spec, classes, model_name)
    temperature = predictor.temperature
    if predictor.applied_temperature is not None:
        model = TemperatureScaled(model, temperature).eval()
    metadata.update(temperature="" if temperature is None else repr(temperature),
                    calibrated=str(predictor.applied_temperature is not None).lower())
    size = int(spec.input_size)
    example = torch.zeros(TRACE_BATCH, 3, size, size)
    images, source = verification_images(config.get("data", {}).get("root"), predictor.preprocess, int(verify_images))
    x = to_float(torch.from_numpy(images), spec.mean, spec.std).contiguous()  # (B, 3, S, S)
    reference = apply_temperature(predictor.logits(images, tta=False), predictor.applied_temperature).numpy()

    out_dir = Path(out_dir)
    final = out_dir / FORMATS[fmt]
    # atomic_path: a read-only or full output folder is one sentence, and no torn file stays.
    with atomic_path(final) as tmp:
        with torch.no_grad():
            if fmt == "onnx":
                used_opset = export_onnx(model, example, tmp, opset, onnx_exporter, metadata)
                run = run_onnx
            else:
                export_torchscript(model, example, tmp, metadata)
                used_opset, run = None, run_torchscript
        exported_all = run(tmp, x.numpy())
        exported_one = run(tmp, x[:1].numpy())
        diff = float(max(np.abs(exported_all - reference).max(), np.abs(exported_one - reference[:1]).max()))
        if not diff <= tolerance:  # `not <=` also catches NaN
            raise InatError(f"The {fmt} export of '{ckpt}' differs from PyTorch by {diff:.3g} (max absolute logit) "
                            f"on {len(x)} images, above the {tolerance:g} tolerance; nothing was written.")
    result = {"format": fmt, "path": str(final.resolve()), "max_abs_diff": diff, "opset": used_opset,
              "n_images": int(len(x)), "images": source, "tolerance": tolerance,
              "exporter": onnx_exporter if fmt == "onnx" else "torch.jit.trace",
              "ckpt": str(Path(ckpt).resolve()), "bytes": final.stat().st_size, "metadata": metadata}
    if quantize != "none":
        from inat.quantize import quantize_and_gate  # onnx and onnxruntime load only to quantize

        try:
            result["quantize"] = quantize_and_gate(final, predictor.state, spec, mode=quantize, max_drop=max_drop,
                                                   calibration_images=calibration_images, input_name=INPUT_NAME)
        except InatError as err:
            # the fp32 file is verified and stays, so its record is written, with why no int8 copy is
            result["quantize"] = getattr(err, "record", {"mode": quantize, "accepted": False, "path": None})
            result["quantize"]["refused"] = str(err)
            write_json(out_dir / EXPORT, result)
            raise
    write_json(out_dir / EXPORT, result)
    return result
