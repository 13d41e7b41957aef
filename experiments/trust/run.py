"""Real-data evidence for Grad-CAM, calibration and the LR finder (small, CPU-sized runs).

1. EfficientNet-Lite0 on flowers5, linear probe on cached features (3 head epochs, 224 px): test
   mode's ECE before / after the temperature fitted on the validation split; its Grad-CAM grid.
2. ``+mode=lr_find`` for the scratch CNN on imagewoof10 at 64 px, then two 4-epoch runs, the
   default train.lr and the suggestion, tested once each.
3. The Grad-CAM grid of the scratch CNN trained by experiments/partA/chain.py (the sweep's best
   configuration on imagewoof10), when that run is there.

    python experiments/trust/run.py
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared" / "datasets"


def run(args: list[str]) -> None:
    cmd = [sys.executable, "run.py", *args]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    work = REPO / "outputs" / "trust"
    out: dict = {"started": time.strftime("%Y-%m-%d %H:%M")}
    lite = work / "lite0_probe"
    if not (lite / "test" / "test.json").is_file():  # a finished probe run is reused
        run(["model=efficientnet_lite0", "finetune=linear_probe", "train.epochs=3", "train.max_minutes=0",
             f"data.root={SHARED / 'flowers5'}", "wandb.mode=disabled", f"hydra.run.dir={lite}"])
    run(["+mode=explain", f"ckpt={lite / 'checkpoints/best.pt'}", "explain.what=[gradcam]",
         f"hydra.run.dir={lite / 'explain'}"])
    test = load(lite / "test" / "test.json")
    out["lite0_flowers5"] = {"test_accuracy": test["accuracy"], "n": test["n"], "macro_f1": test["macro_f1"],
                             "calibration": test["calibration"],
                             "precision": load(lite / "summary.json").get("precision")}
    env = load(lite / "summary.json")["environment"]
    out["machine"] = {k: env.get(k) for k in ("cpu", "cpu_count", "cpu_capability", "torch")}
    shutil.copy(lite / "explain" / "gradcam.png", HERE / "gradcam_lite0_flowers5.png")
    shutil.copy(lite / "test" / "reliability.png", HERE / "reliability_lite0_flowers5.png")

    woof = [f"data.root={SHARED / 'imagewoof10'}", "data.image_size=64", "wandb.mode=disabled"]
    finder = work / "lr_find"
    run(["+mode=lr_find", *woof, f"hydra.run.dir={finder}"])
    found = load(finder / "lr_find.json")
    shutil.copy(finder / "lr_find.png", HERE / "lr_find_scratch_woof64.png")
    out["lr_find"] = {k: found[k] for k in ("suggestion", "rule", "rule_says", "candidates", "steps",
                                            "epoch_fraction", "train_lr")}
    for name, lr in (("default_lr", found["train_lr"]), ("suggested_lr", found["suggestion"])):
        d = work / name
        run([*woof, "train.epochs=4", "train.max_minutes=0", f"train.lr={lr}", f"hydra.run.dir={d}"])
        out[name] = {"lr": lr, "test_accuracy": load(d / "test" / "test.json")["accuracy"],
                     "best_val_accuracy": load(d / "summary.json")["best_val_accuracy"],
                     "precision": load(d / "summary.json").get("precision")}
    chain = REPO / "outputs" / "partA_chain" / "best_full" / "checkpoints" / "best.pt"
    if chain.is_file():
        run(["+mode=explain", f"ckpt={chain}", "explain.what=[gradcam]", f"hydra.run.dir={work / 'scratch_cam'}"])
        out["scratch_gradcam"] = load(work / "scratch_cam" / "explain.json").get("gradcam")
    out["finished"] = time.strftime("%Y-%m-%d %H:%M")
    out["command"] = "python experiments/trust/run.py"
    (HERE / "results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
