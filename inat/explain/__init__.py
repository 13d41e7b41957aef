"""Explanations of a trained checkpoint: prediction grid, filters, guided backprop, confusion, Grad-CAM.

``python run.py +mode=explain ckpt=PATH explain.what=[grid,filters,guided_backprop,confusion,gradcam]``
writes PNG figures and an ``explain.json`` (figure file names plus the numbers behind them)
into the Hydra output folder. ``explain_checkpoint`` is the same thing as a function, which
the report calls for the best run. The test folder is scored once, and only when a figure
needs it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from inat.choices import EXPLAIN_FIGURES
from inat.data.dataset import dataset_root
from inat.errors import InatError
from inat.explain.confusion import draw_confusion
from inat.explain.grid import draw_grid
from inat.run_folder import EXPLAIN_FILE, GRADCAM
from inat.runs import write_json

WHAT = EXPLAIN_FIGURES

__all__ = ["explain_checkpoint", "WHAT"]


def _check_image(image: str) -> None:
    """``explain.image`` must name one image file: refuse a folder or a missing path in one sentence."""
    if Path(image).is_dir():
        raise InatError(f"explain.image '{image}' is a folder; explain.image takes one image file (the picture "
                        f"whose feature maps are drawn), e.g. explain.image={Path(image) / '<photo>.jpg'}.")
    if not Path(image).is_file():
        raise InatError(f"explain.image '{image}' does not exist.")


def explain_checkpoint(ckpt: str | Path, out_dir: Path, *, what: Sequence[str] = WHAT, data_root: Optional[str] = None,
                       pick: str = "random", seed: int = 0, per_class: int = 3, neurons: Optional[Sequence[int]] = None,
                       n_neurons: int = 10, image: Optional[str] = None, batch_size: int = 128,
                       cam_method: str = "gradcam") -> Dict[str, Any]:
    """Draw the requested figures for ``ckpt`` into ``out_dir`` and return explain.json's content.

    ``data_root`` defaults to the root the checkpoint was trained on. Test images are read
    through the test-folder guard with the checkpoint's preprocessing and scored by its
    ``Predictor``, on the device ``pick_device`` chooses (the GPU when there is one); the
    figures' gradients run there too.
    """
    # torch (the predictor and the figures that take gradients) loads here, not at the top: this __init__
    # runs before every module of inat.explain, and the report imports it for one function
    from inat.predictor import Predictor

    unknown = [w for w in what if w not in WHAT]
    if unknown or not what:
        raise InatError(f"Unknown explain.what {unknown or '[]'}: valid are {', '.join(WHAT)}.")
    if image:  # before any figure is drawn: a refusal leaves no half-filled folder
        _check_image(image)
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoint(ckpt)  # the checkpoint is read once
    state, model, spec, classes = predictor.state, predictor.model, predictor.spec, predictor.classes
    root = data_root or dataset_root(predictor.config["data"], fetch=False)  # a manifest's folder, else data.root

    scores = None
    needs_scores = bool({"grid", "guided_backprop", "confusion", "gradcam"} & set(what)) or ("filters" in what and not image)
    if needs_scores:
        from inat.explain.scoring import score_test_folder

        # Scored as test mode does (the run's tta_flip); the confidences shown in the figures are
        # calibrated when the run fitted a temperature.
        scores = score_test_folder(predictor, root, batch_size=batch_size,
                                   cache_dir=predictor.config["data"].get("cache_dir", ""))

    result: Dict[str, Any] = {"ckpt": str(ckpt), "data_root": str(root), "classes": classes, "figures": {},
                              "temperature": state.get("temperature")}
    if scores is not None:
        result.update(test_accuracy=scores.accuracy, n=len(scores.labels))
    if "grid" in what:
        result["grid"] = draw_grid(scores, out_dir / "grid.png", per_class=per_class, pick=pick, seed=seed)
        result["figures"]["grid"] = "grid.png"
    if "filters" in what:
        from inat.explain.filters import draw_feature_maps, draw_filters

        result["filters"] = draw_filters(model, out_dir / "filters.png")
        if image:
            picture, name = predictor.decode([Path(image)])[0], Path(image).name
        else:
            i = int(np.random.default_rng(seed).integers(len(scores.labels)))
            picture, name = scores.images[i], f"{Path(scores.paths[i]).name} ({classes[scores.labels[i]]})"
        result["feature_maps"] = {"image": name, **draw_feature_maps(model, spec, picture, out_dir / "feature_maps.png", name)}
        result["figures"].update(filters="filters.png", feature_maps="feature_maps.png")
    if "guided_backprop" in what:
        from inat.explain.guided_backprop import draw_guided_backprop

        result["guided_backprop"] = draw_guided_backprop(model, spec, scores, out_dir / "guided_backprop.png",
                                                         neurons=neurons, count=n_neurons)
        result["figures"]["guided_backprop"] = "guided_backprop.png"
    if "confusion" in what:
        result["confusion"] = draw_confusion(scores, out_dir / "confusion.png", out_dir / "mistakes.png")
        result["figures"].update(confusion="confusion.png", mistakes="mistakes.png")
    if "gradcam" in what:
        from inat.explain.gradcam import draw_gradcam_grid

        result["gradcam"] = draw_gradcam_grid(model, spec, scores, out_dir / GRADCAM, per_class=per_class,
                                              seed=seed, method=cam_method)
        result["figures"]["gradcam"] = GRADCAM
    result["seconds"] = round(time.time() - start, 1)
    write_json(out_dir / EXPLAIN_FILE, result)
    return result
