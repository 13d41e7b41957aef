"""The camera-trap watcher: ``python run.py +mode=detect detect.inputs=[...]``.

Reads images, folders of frames and videos, runs the YOLO detector on every frame, and
writes into the run folder: annotated images (``frames/``), an annotated video per input
video (``<stem>_annotated.mp4``), a snapshot per loitering alert (``alerts/``), a JSON-lines
event log (``events.jsonl``) and ``detect.json`` (frames, detections per class, alerts, speed;
named apart from a training run's ``summary.json``, so no run reader takes this folder for a
run). With ``detect.classify=CKPT`` each detected animal is cropped and named by an inat
classifier.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from inat.data.images import open_upright
from inat.detect.detector import Detection, Detector, check_class_names
from inat.detect.track import LoiterTracker, Track
from inat.errors import InatError
from inat.predictor import UNKNOWN, Predictor
from inat.run_folder import DETECT, DETECT_EVENTS
from inat.runs import write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg"}
# COCO classes an animal classifier can sensibly name (people and objects are left alone).
ANIMALS = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}


@dataclass
class Frame:
    """One frame to watch: where it came from, its index and its BGR pixels."""

    source: str
    index: int
    image_bgr: np.ndarray
    video_seconds: Optional[float]
    stem: str


def find_sources(inputs: Sequence[str]) -> List[Tuple[str, Path, List[Path]]]:
    """Expand ``detect.inputs`` into (kind, path, frame files) with kind image/folder/video.

    A folder is one sequence of frames in name order (a camera trap's burst), so tracking
    and loitering run across its images; a loose image is a sequence of one frame.
    """
    if not inputs:
        raise InatError("detect.inputs is empty: give image files, folders or videos, e.g. 'detect.inputs=[photo.jpg]'.")
    sources = []
    for item in inputs:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InatError(f"Folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            sources.append(("folder", path, files))
        elif not path.is_file():
            raise InatError(f"Input {path} does not exist.")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(("image", path, [path]))
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            sources.append(("video", path, []))
        else:
            raise InatError(
                f"Input {path} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                f"nor a video ({', '.join(sorted(VIDEO_SUFFIXES))})."
            )
    return sources


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 BGR, or refuse with one sentence.

    Through the classifier's own decoder (EXIF orientation applied, 16-bit scaled), so a
    crop named by ``detect.classify`` has the pixels predict would see in the same photo.
    """
    try:
        rgb = np.asarray(open_upright(path))  # (H, W, 3)
    except InatError as err:
        raise InatError(f"Cannot read image {path}: the file is not a decodable image.") from err
    return np.ascontiguousarray(rgb[:, :, ::-1])  # RGB -> BGR, the detector's and OpenCV's order


def iter_frames(kind: str, path: Path, files: List[Path],
                skipped: Optional[List[Tuple[str, str]]] = None) -> Iterator[Frame]:
    """Yield the frames of one source; a video that OpenCV cannot open or decode is refused.

    An unreadable image in a folder is skipped with a warning (and appended to ``skipped``),
    as predict does, instead of stopping the whole watch at the first bad file.
    """
    import cv2

    if kind != "video":
        for index, file in enumerate(files):
            try:
                image = read_image(file)
            except InatError as err:
                print(f"warning: skipped '{file}' (not a decodable image)", file=sys.stderr, flush=True)
                if skipped is not None:
                    skipped.append((str(file), str(err)))
                continue
            yield Frame(str(file), index, image, None, file.stem)
        return
    capture = cv2.VideoCapture(str(path))
    try:
        ok, image = capture.read() if capture.isOpened() else (False, None)
        if not ok or image is None:
            raise InatError(f"Cannot read video {path}: OpenCV could not decode a first frame.")
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        index = 0
        while ok:
            seconds = round(index / fps, 3) if fps > 0 else None
            yield Frame(str(path), index, image, seconds, f"{path.stem}_{index:06d}")
            index += 1
            ok, image = capture.read()
    finally:
        capture.release()


class Species(NamedTuple):
    """A detected animal's name from the classifier: ``unknown`` (with ``guess``) below the rejection threshold."""

    name: str
    score: float  # the calibrated probability of the top class
    guess: Optional[str] = None  # the top class when ``name`` is unknown


class SpeciesNamer:
    """Names crops of detected animals with an inat classifier checkpoint (``detect.classify``).

    The checkpoint's ``Predictor``: its device, precision, preprocessing (size, interpolation,
    crop_pct, as in test mode) and calibrated probabilities when the run fitted a temperature.
    With ``reject`` (``predict.reject=true``) a crop below the checkpoint's rejection threshold
    is named ``unknown``; a checkpoint without a threshold is refused here, before any frame.
    """

    def __init__(self, checkpoint: str, reject: bool = False) -> None:
        # Imported here: the classifier stack is only needed when this option is used.
        if not Path(checkpoint).is_file():
            raise InatError(f"Classifier checkpoint {checkpoint} (detect.classify) does not exist.")
        self.predictor = Predictor.from_checkpoint(checkpoint)
        self.reject = reject
        if reject:
            self.predictor.require_threshold()

    def name(self, image_rgb: np.ndarray, boxes: Sequence[Tuple[float, float, float, float]]) -> List[Species]:
        """The :class:`Species` of each box's crop of the ``(H, W, 3)`` RGB image."""
        if not boxes:
            return []
        crops = []
        for x1, y1, x2, y2 in boxes:
            crop = image_rgb[int(y1):max(int(y1) + 1, int(round(y2))), int(x1):max(int(x1) + 1, int(round(x2)))]
            crops.append(self.predictor.preprocess.array(crop))  # (S, S, 3) uint8
        probs = self.predictor.probabilities(np.stack(crops), tta=False)
        unknown = self.predictor.rejected(probs).tolist() if self.reject else [False] * len(boxes)
        return [Species(UNKNOWN, round(top[0][1], 4), top[0][0]) if no else Species(top[0][0], round(top[0][1], 4))
                for top, no in zip(self.predictor.top_k(probs, 1), unknown)]


def draw(image_bgr: np.ndarray, detections: Sequence[Detection], watched: set, labels: Dict[int, str],
         loitering: set, header: str) -> np.ndarray:
    """Annotate a copy of the frame: watched classes in colour, loiterers red, others grey."""
    import cv2

    out = image_bgr.copy()
    thick = max(1, round(max(out.shape[:2]) / 400))
    for index, det in enumerate(detections):
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        if det.name not in watched:
            color, width = (160, 160, 160), 1
        elif index in loitering:
            color, width = (0, 0, 255), thick + 1
        else:
            color, width = (0, 200, 0), thick
        cv2.rectangle(out, (x1, y1), (x2, y2), color, width)
        text = labels.get(index, f"{det.name} {det.score:.2f}")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(0, y1 - th - base - 2)
        cv2.rectangle(out, (x1, top), (x1 + tw + 4, top + th + base + 2), color, -1)
        cv2.putText(out, text, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    # A dark banner keeps the header readable on any background.
    (tw, th), base = cv2.getTextSize(header, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)
    cv2.rectangle(out, (0, 0), (tw + 16, th + base + 12), (30, 30, 30), -1)
    cv2.putText(out, header, (8, th + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _event(frame: Frame, det: Detection, kind: str, track: Track, species: Optional[Species]) -> Dict[str, Any]:
    event: Dict[str, Any] = {
        "source": frame.source,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "video_seconds": frame.video_seconds,
        "frame": frame.index,
        "class": det.name,
        "score": round(det.score, 4),
        "box": [round(v, 1) for v in det.box],
        "event": kind,
        "track": track.track_id,
        "frames_in_view": track.frames,
    }
    if species is not None:
        event["species"], event["species_score"] = species.name, species.score
        if species.guess is not None:
            event["species_guess"] = species.guess
    return event


def watch(detect_cfg: Any, out_dir: Path, reject: bool = False) -> Dict[str, Any]:
    """Run the watcher over ``detect_cfg.inputs``; write outputs into ``out_dir``; return ``detect.json``'s content.

    ``reject`` (``predict.reject``): the species namer says ``unknown`` below its checkpoint's threshold.

    ``detect_cfg`` is the ``detect`` section of the config (``DetectConfig``). Events:
    one "detection" per watched object per frame, and one "loitering" when a tracked
    object of a watched class stays in view more than ``loiter_frames`` consecutive frames.
    """
    import cv2

    detector = Detector(detect_cfg.cfg, detect_cfg.weights, detect_cfg.names, size=detect_cfg.size,
                        conf=detect_cfg.conf, iou=detect_cfg.iou)
    watched = set(check_class_names(list(detect_cfg.watch), detector.names))
    if detect_cfg.loiter_frames < 1:
        raise InatError(f"detect.loiter_frames must be at least 1, got {detect_cfg.loiter_frames}.")
    sources = find_sources(list(detect_cfg.inputs))
    namer = SpeciesNamer(detect_cfg.classify, reject=reject) if detect_cfg.classify else None

    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    alerts: List[Dict[str, Any]] = []
    frames_done, detect_seconds = 0, 0.0
    started = time.perf_counter()
    skipped: List[Tuple[str, str]] = []
    with open(out_dir / DETECT_EVENTS, "w") as log:
        for kind, path, files in sources:
            tracker = LoiterTracker(detect_cfg.loiter_frames)
            writer = None
            try:
                for frame in iter_frames(kind, path, files, skipped):
                    image_rgb = cv2.cvtColor(frame.image_bgr, cv2.COLOR_BGR2RGB)
                    tick = time.perf_counter()
                    detections = detector.detect(image_rgb)
                    detect_seconds += time.perf_counter() - tick
                    frames_done += 1
                    mine = [i for i, d in enumerate(detections) if d.name in watched]
                    by_det, alerting = tracker.update([detections[i] for i in mine])
                    animals = [i for i in mine if detections[i].name in ANIMALS] if namer else []
                    species = dict(zip(animals, namer.name(image_rgb, [detections[i].box for i in animals]))) if namer else {}
                    labels, loitering = {}, set()
                    for local, index in enumerate(mine):
                        det, track = detections[index], by_det[local]
                        counts[det.name] += 1
                        log.write(json.dumps(_event(frame, det, "detection", track, species.get(index))) + "\n")
                        if track in alerting:
                            event = _event(frame, det, "loitering", track, species.get(index))
                            log.write(json.dumps(event) + "\n")
                            alerts.append(event)
                        if track.alerted:
                            loitering.add(index)
                        name = f"{species[index].name} ({det.name})" if index in species else det.name
                        labels[index] = f"{name} {det.score:.2f}" + (f" LOITERING {track.frames}f" if track.alerted else "")
                    log.flush()
                    when = f" t={frame.video_seconds:.1f}s" if frame.video_seconds is not None else ""
                    header = f"{Path(frame.source).name} frame {frame.index}{when}: " + (
                        ", ".join(f"{n} x{c}" for n, c in sorted(Counter(detections[i].name for i in mine).items())) or "nothing watched")
                    annotated = draw(frame.image_bgr, detections, watched, labels, loitering, header)
                    if kind == "video":
                        if detect_cfg.save_video and writer is None:
                            writer = _video_writer(cv2, out_dir / f"{path.stem}_annotated.mp4", path, annotated.shape)
                        if writer is not None:
                            writer.write(annotated)
                    else:
                        (out_dir / "frames").mkdir(exist_ok=True)
                        cv2.imwrite(str(out_dir / "frames" / f"{frame.stem}.jpg"), annotated)
                    if alerting:
                        (out_dir / "alerts").mkdir(exist_ok=True)
                        cv2.imwrite(str(out_dir / "alerts" / f"{frame.stem}_loitering.jpg"), annotated)
            finally:
                if writer is not None:
                    writer.release()
    wall = time.perf_counter() - started
    if frames_done == 0 and skipped:
        (out_dir / DETECT_EVENTS).unlink(missing_ok=True)  # nothing watched: no output that looks finished
        raise InatError(f"None of the {len(skipped)} input image(s) could be decoded (first: '{skipped[0][0]}').")
    summary = {
        "frames": frames_done,
        "skipped": [path for path, _ in skipped],
        "detections_per_class": dict(sorted(counts.items())),
        "loitering_alerts": [{k: a[k] for k in ("source", "frame", "class", "track")} for a in alerts],
        "detector_frames_per_second": round(frames_done / detect_seconds, 2) if detect_seconds else None,
        "overall_frames_per_second": round(frames_done / wall, 2) if wall else None,
        "size": detect_cfg.size,
        "watch": sorted(watched),
        "environment": _environment(detector.device),  # the speed is this machine's: CPU, capability, threads
    }
    write_json(out_dir / DETECT, summary)
    return summary


def _environment(device: str) -> Dict[str, Any]:
    from inat.training.writer import environment  # here, not at import: the training package is heavy

    return environment(torch.device(device))


def _video_writer(cv2: Any, target: Path, source: Path, shape: Tuple[int, ...]) -> Any:
    """An mp4 writer at the source video's frame rate, or None (with a note) if OpenCV cannot."""
    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    capture.release()
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        print(f"note: OpenCV cannot write {target}; the annotated video is skipped.")
        return None
    return writer


def print_summary(summary: Dict[str, Any], out_dir: Path) -> None:
    """Print the per-class counts, alerts and speed in a few lines."""
    print(f"watched {summary['frames']} frames ({', '.join(summary['watch'])}); outputs in {out_dir}")
    counts = summary["detections_per_class"]
    print("detections: " + (", ".join(f"{n} {c}" for n, c in counts.items()) or "none"))
    alerts = summary["loitering_alerts"]
    print(f"loitering alerts: {len(alerts)}")
    for alert in alerts:
        print(f"  {alert['class']} (track {alert['track']}) in {alert['source']} from frame {alert['frame']}")
    print(f"speed: {summary['detector_frames_per_second']} frames/s detector, "
          f"{summary['overall_frames_per_second']} frames/s overall at size {summary['size']}")
