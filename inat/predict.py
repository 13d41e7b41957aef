"""Predict mode: score image files and folders with a checkpoint, top-k classes per image.

``+mode=predict ckpt=PATH predict.inputs=[PATH,...]`` rebuilds the model from the checkpoint
alone and preprocesses every image exactly as the run did (the checkpoint's ModelSpec: input
size, mean, std, interpolation, crop), so a scratch CNN and a fine-tuned backbone need the
same command. Folders are walked recursively for image files. An unreadable file costs one
warning line, not the run; only when nothing at all could be scored does the mode fail.
Results go to ``predictions.jsonl`` in the output folder, one JSON object per image.
Probabilities are ``softmax(logits / T)`` with the checkpoint's fitted temperature T when it
has one (``predict.calibrated=false`` gives the raw softmax).
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from inat.data.folder import IMAGE_EXTENSIONS
from inat.errors import InatError
from inat.inference import Preprocess
from inat.models import ModelSpec
from inat.predictor import UNKNOWN, Predictor
from inat.run_folder import PREDICTIONS
from inat.runs import atomic_open, usable_cpus

PREDICTIONS_FILE = PREDICTIONS  # the name predict writes, kept for callers of the older spelling


@dataclass
class PredictResult:
    """What a predict run did: records written, files skipped, where the JSONL went."""

    records: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    path: Optional[Path] = None
    temperature: Optional[float] = None  # the T probabilities were divided by; None = raw softmax
    reject_threshold: Optional[float] = None  # with predict.reject: below it an image is "unknown"

    @property
    def unknown(self) -> int:
        """How many images were answered ``unknown``."""
        return sum(1 for r in self.records if r.get("unknown"))


def collect_images(inputs: Sequence[str | os.PathLike]) -> List[Path]:
    """Expand files and folders into a list of image paths, in a stable order, without repeats.

    A folder contributes every file below it (recursively) whose extension is an image
    extension, sorted; a file named explicitly is always taken, whatever its extension, since
    the user asked for it (a non-image then becomes one warning when it fails to decode). A
    path that does not exist raises InatError naming it.
    """
    if not inputs:
        raise InatError("Predict mode needs images: add predict.inputs=[PATH,...] (image files and/or folders).")
    paths: List[Path] = []
    seen = set()
    for item in inputs:
        path = Path(str(item)).expanduser()
        if not path.exists():
            raise InatError(f"Input '{item}' does not exist; predict.inputs takes image files and folders.")
        found = ([path] if path.is_file() else
                 sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths


def _decode_chunk(pool: ThreadPoolExecutor, paths: Sequence[Path], preprocess: Preprocess) -> List[Future]:
    return [pool.submit(preprocess.file, p) for p in paths]


def iter_decoded(paths: Sequence[Path], spec: ModelSpec, batch_size: int, workers: int
                 ) -> Iterator[Tuple[List[Path], np.ndarray, List[Tuple[Path, str]]]]:
    """Yield ``(decoded paths, (B, S, S, 3) uint8, [(failed path, reason)])`` chunk by chunk.

    Files are decoded with the spec's preprocessing (``Preprocess.from_spec``). PIL releases
    the GIL while decoding, so a small thread pool decodes in parallel; the next chunk is
    already being decoded while the caller scores this one, and at most two chunks are held
    in memory, however large the folder.
    """
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    preprocess = Preprocess.from_spec(spec)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = _decode_chunk(pool, chunks[0], preprocess)
        for i, chunk in enumerate(chunks):
            futures = pending
            if i + 1 < len(chunks):
                pending = _decode_chunk(pool, chunks[i + 1], preprocess)
            good, arrays, bad = [], [], []
            for path, fut in zip(chunk, futures):
                try:
                    arrays.append(fut.result())
                    good.append(path)
                except InatError as err:
                    # decode_image's sentence points at +mode=audit; one line per file wants just the cause
                    cause = err.__cause__
                    bad.append((path, f"{type(cause).__name__}: {cause}" if cause else str(err)))
            size = preprocess.size
            batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), dtype=np.uint8)
            yield good, batch, bad


def top_k_record(path: Path, top: Sequence[Tuple[str, float]], unknown: Optional[bool] = None) -> Dict[str, Any]:
    """One JSONL object: ``path``, ``class`` and ``probability`` of the top class, ``top_k`` list.

    ``top`` is one row of ``Predictor.top_k``: ``(class, probability)`` pairs, best first.
    ``unknown`` (predict.reject only) adds the key: when True, ``class`` is ``unknown`` and
    ``guess`` holds the top class (``probability`` stays its probability).
    """
    rows = [{"class": name, "probability": round(p, 6)} for name, p in top]
    record = {"path": str(path), "class": rows[0]["class"], "probability": rows[0]["probability"], "top_k": rows}
    if unknown is not None:
        record["unknown"] = bool(unknown)
    if unknown:
        record.update({"class": UNKNOWN, "guess": rows[0]["class"]})
    return record


def record_line(record: Dict[str, Any]) -> str:
    """The printed line of one record: its top-k classes, or ``unknown`` with the top guess."""
    if record.get("unknown"):
        return f"{record['path']}: {UNKNOWN} (top guess {record['guess']} {record['probability']:.3f})"
    return f"{record['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in record["top_k"])


def predict_images(ckpt: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: Path, *, top_k: int = 3,
                   tta: bool = False, batch_size: int = 64, workers: int = 0, echo: bool = True,
                   precision: str = "auto", calibrated: bool = True, reject: bool = False) -> PredictResult:
    """Score every image under ``inputs`` with the checkpoint and write ``predictions.jsonl``.

    Prints each image's top-k classes (when ``echo``) and one warning line per unreadable
    file. The JSONL is written to a temp name and renamed at the end, so an interrupted run
    leaves no partial file. With ``reject``, an image whose calibrated top-1 probability is
    below the checkpoint's rejection threshold is answered ``unknown`` (with its top guess).
    Raises InatError for a missing input, no images found, no image readable, or ``reject``
    without a stored threshold; otherwise the result lists the records and the skipped files.
    """
    if top_k < 1:
        raise InatError(f"predict.top_k must be at least 1 (got {top_k}).")
    if batch_size < 1:
        raise InatError(f"predict.batch_size must be at least 1 (got {batch_size}).")
    paths = collect_images(inputs)
    if not paths:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InatError(f"No image files ({extensions}) found in {', '.join(map(str, inputs))}.")
    # The process's policy (fp32 unless the hardware has native bf16/fp16): emulated bf16 on
    # a CPU is slower than fp32, and native half precision never flips a clear top class.
    predictor = Predictor.from_checkpoint(ckpt, precision=precision, calibrated=calibrated)
    threshold = predictor.require_threshold() if reject else None  # before anything is decoded or written
    workers = workers or min(8, usable_cpus())

    final = Path(out_dir) / PREDICTIONS
    result = PredictResult(temperature=predictor.applied_temperature, reject_threshold=threshold)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=len(paths) <= batch_size, mininterval=1.0)
    try:
        # atomic_open: a read-only or full output folder is one sentence, and no torn file stays.
        with atomic_open(final, "w") as fh:
            for good, images, bad in iter_decoded(paths, predictor.spec, batch_size, workers):
                for path, reason in bad:
                    result.skipped.append((str(path), reason))
                    bar.write(f"warning: skipped '{path}' ({reason})", file=sys.stderr)
                if len(good):
                    probs = predictor.probabilities(images, tta=tta, batch_size=batch_size)
                    unknown = predictor.rejected(probs).tolist() if reject else [None] * len(good)
                    for path, top, no in zip(good, predictor.top_k(probs, top_k), unknown):
                        record = top_k_record(path, top, no)
                        result.records.append(record)
                        fh.write(json.dumps(record) + "\n")
                        if echo:
                            bar.write(record_line(record))
                bar.update(len(good) + len(bad))
            bar.close()
            if not result.records:
                raise InatError(f"None of the {len(paths)} input file(s) could be decoded, so nothing was scored "
                                f"(first: '{result.skipped[0][0]}').")
    finally:
        bar.close()
    result.path = final
    return result
