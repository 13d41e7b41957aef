"""Camera-trap demo: a video from the shared photos, watched by yolov3-tiny through run.py.

Run from the repository root:  .venv/bin/python experiments/detect/demo.py
It writes outputs/detect/demo/ (the full run: annotated mp4, alert snapshots, events) and
copies next to this script the small results we commit: detect.json (frames, detections per
class, every loitering alert, speed) and one annotated alert frame (alert_frame.jpg); the event
log (events.jsonl) repeats detect.json's alerts line by line and stays in the run folder.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMAGES = REPO.parent / "shared/images"
PHOTOS = ["dog.jpg", "person.jpg", "horses.jpg", "eagle.jpg", "giraffe.jpg", "kite.jpg"]
REPEAT, FPS, SIZE = 8, 4.0, (640, 480)  # each photo stays 2 s in view: longer than loiter_frames=5


def make_video(path: Path) -> None:
    """Letterbox each photo onto a black 640x480 frame and hold it for REPEAT frames."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    if not writer.isOpened():
        sys.exit("OpenCV cannot write mp4 here.")
    for name in PHOTOS:
        image = cv2.imread(str(IMAGES / name))
        scale = min(SIZE[0] / image.shape[1], SIZE[1] / image.shape[0])
        resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
        top, left = (SIZE[1] - resized.shape[0]) // 2, (SIZE[0] - resized.shape[1]) // 2
        canvas[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
        for _ in range(REPEAT):
            writer.write(canvas)
    writer.release()


def benchmark(rounds: int = 5) -> None:
    """Median per-frame time of yolov3-tiny at 416 (letterbox + network + NMS) on the photos."""
    import statistics
    import time

    import cv2
    import torch

    sys.path.insert(0, str(REPO))
    from inat.detect import Detector

    detector = Detector(size=416)
    frames = [cv2.cvtColor(cv2.imread(str(IMAGES / name)), cv2.COLOR_BGR2RGB) for name in PHOTOS]
    for frame in frames:  # warm-up: first calls allocate and pick kernels
        detector.detect(frame)
    times = []
    for _ in range(rounds):
        for frame in frames:
            start = time.perf_counter()
            detector.detect(frame)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"benchmark: yolov3-tiny at 416, {torch.get_num_threads()} threads, {len(times)} frames: "
          f"median {1000 * median:.1f} ms/frame = {1 / median:.1f} frames/s (best {1 / min(times):.1f})")


def main() -> None:
    run_dir = REPO / "outputs/detect/demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    video = (run_dir / "camera_trap.mp4").relative_to(REPO)  # relative, so the log names no home folder
    make_video(REPO / video)
    command = [sys.executable, "run.py", "+mode=detect", f"detect.inputs=[{video}]", "detect.loiter_frames=5",
               f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command))
    subprocess.run(command, cwd=REPO, check=True)
    sys.path.insert(0, str(REPO))
    from inat import run_folder

    alerts = sorted((run_dir / "alerts").glob("*.jpg"))
    # The dog photo's alert: the classic darknet test frame, with a bicycle and cars around it.
    shutil.copy(alerts[0], HERE / "alert_frame.jpg")
    shutil.copy(run_dir / run_folder.DETECT, HERE / run_folder.DETECT)
    print(f"copied {alerts[0].name} and {run_folder.DETECT} to {HERE}")
    benchmark()


if __name__ == "__main__":
    main()
