"""Grad-CAM and Grad-CAM++: where in the image a model looks when it scores a class.

Hand-written on a forward hook rather than Captum's ``LayerGradCam``: Captum is not
installed here and cannot be fetched offline, the whole method is a forward hook plus one
``autograd.grad`` call (about sixty lines), and owning it lets the same code run on every
model of the registry through the interface's ``cam_layer_name()`` (scratch CONV5, a
backbone's last convolutional stage) with no wrapper objects. The hook is removed and the
model's train/eval mode restored in ``finally``, also when the forward pass raises.

Grad-CAM (Selvaraju et al. 2017): for the layer's activations A (B, C, h, w) and the class
score y, channel weights are the spatially averaged gradients ``w_c = mean_hw dy/dA_c`` and
the map is ``relu(sum_c w_c A_c)``. Grad-CAM++ (Chattopadhay et al. 2018) weighs each
position by ``alpha = g^2 / (2 g^2 + sum_hw(A) g^3)`` and sums only positive gradients, which
covers several instances of a class better; the closed form assumes ``exp(y)``, as the
paper's and pytorch-grad-cam's implementations do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from inat.choices import CAM_METHODS
from inat.errors import InatError
from inat.explain.scoring import model_device, normalise
from inat.models.base import InatModel, ModelSpec

METHODS = CAM_METHODS


def class_activation_maps(model: InatModel, x: torch.Tensor, target: Optional[torch.Tensor] = None,
                          method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps (B, H, W) in [0, 1] at the input's size, logits (B, K))`` for normalised ``x`` (B, 3, H, W).

    ``target`` (B,) holds the class each map explains; None = the predicted class. Each map
    is divided by its own maximum (an all-zero map stays zero). Parameter gradients are not
    touched: the gradient is taken with ``torch.autograd.grad`` on the hooked activations only.
    """
    if method not in METHODS:
        raise InatError(f"Unknown explain.cam_method '{method}': valid are {', '.join(METHODS)}.")
    layer = model.cam_layer()
    captured: List[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # The input needs grad so the hooked activations are in the graph even when every
            # parameter is frozen (a linear probe's backbone).
            logits = model(x.detach().clone().requires_grad_(True)).float()  # (B, K)
            acts = captured[-1]  # (B, C, h, w)
            if acts.ndim != 4:
                raise InatError(f"Grad-CAM needs a spatial feature map at '{model.cam_layer_name()}', which has shape "
                                f"{tuple(acts.shape)}; this model has no convolutional stage to explain.")
            if target is None:
                target = logits.argmax(1)
            # Samples are independent in eval mode, so one backward of the summed scores gives
            # every sample its own gradient.
            score = logits.gather(1, target.to(logits.device).long()[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
        model.train(was_training)
    acts, grads = acts.detach().float(), grads.detach().float()
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    else:
        g2, g3 = grads ** 2, grads ** 3
        denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
        weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * acts).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    peak = cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    return cam / peak, logits.detach()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) map in [0, 1] -> (H, W, 3) float blend with the jet colormap."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]  # (H, W, 3)
    return np.clip((1 - alpha) * image.astype(np.float32) / 255.0 + alpha * heat, 0.0, 1.0)


def pick_correct_and_wrong(labels: np.ndarray, preds: np.ndarray, n_classes: int, per_class: int,
                           seed: int) -> List[List[int]]:
    """Per class, up to ``per_class`` test images: correct ones first, then wrong ones, each a
    seeded sample, with at least one of each when the class has both (so they sit side by side)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_classes):
        members = np.flatnonzero(labels == k)
        right = rng.permutation(members[preds[members] == k]).tolist()
        wrong = rng.permutation(members[preds[members] != k]).tolist()
        n_wrong = min(len(wrong), max(1 if wrong else 0, per_class - len(right)))
        n_right = min(len(right), per_class - n_wrong)
        rows.append([int(i) for i in right[:n_right] + wrong[:n_wrong]])
    return rows


def draw_gradcam_grid(model: InatModel, spec: ModelSpec, scores, out: Path, per_class: int = 3, seed: int = 0,
                      method: str = "gradcam") -> Dict:
    """The test grid with heatmaps: one row per class, ``per_class`` images, correct ones left of wrong ones.

    Every image gets two panels: the map for the predicted class and the map for the true
    class (identical for a correct prediction; for a mistake they show what misled the model
    and where the true class's evidence was). ``scores`` is a ``TestScores``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pick_correct_and_wrong(scores.labels, scores.preds, len(scores.classes), per_class, seed)
    flat = [i for r in rows for i in r]
    maps_pred: Dict[int, np.ndarray] = {}
    maps_true: Dict[int, np.ndarray] = {}
    device = model_device(model)  # where explain's Predictor put the model (the GPU when there is one)
    for start in range(0, len(flat), 16):
        idx = flat[start:start + 16]
        x = normalise(scores.images[idx], spec, device)  # (b, 3, S, S)
        pred = torch.as_tensor(scores.preds[idx])
        true = torch.as_tensor(scores.labels[idx])
        cam_p, _ = class_activation_maps(model, x, pred, method)
        cam_t, _ = class_activation_maps(model, x, true, method)
        cam_p, cam_t = cam_p.cpu(), cam_t.cpu()  # one copy per batch of maps
        for j, i in enumerate(idx):
            maps_pred[i], maps_true[i] = cam_p[j].numpy(), cam_t[j].numpy()
    n_rows = len(rows)
    fig, axes = plt.subplots(n_rows, 2 * per_class, figsize=(1.7 * 2 * per_class, 1.85 * n_rows + 0.5), squeeze=False)
    shown = []
    for r, indices in enumerate(rows):
        for c in range(per_class):
            pair = axes[r, 2 * c:2 * c + 2]
            for ax in pair:
                ax.set_xticks([])
                ax.set_yticks([])
            if c == 0:
                pair[0].set_ylabel(scores.classes[r][:18], fontsize=8, fontweight="bold")
            if c >= len(indices):
                for ax in pair:
                    ax.axis("off")
                continue
            i = indices[c]
            pred, true = int(scores.preds[i]), int(scores.labels[i])
            ok = pred == true
            colour = "#1a9641" if ok else "#d7191c"
            pair[0].imshow(overlay(scores.images[i], maps_pred[i]))
            pair[0].set_title(f"{'✓' if ok else '✗'} pred {scores.classes[pred][:12]} {100 * scores.probs[i, pred]:.0f}%",
                              fontsize=6, color=colour)
            pair[1].imshow(overlay(scores.images[i], maps_true[i]))
            pair[1].set_title(f"true {scores.classes[true][:12]}", fontsize=6)
            for ax in pair:
                for s in ax.spines.values():
                    s.set_edgecolor(colour)
                    s.set_linewidth(2.5)
            shown.append({"image": str(scores.paths[i]), "true": scores.classes[true], "pred": scores.classes[pred],
                          "correct": bool(ok), "peak_pred": _peak(maps_pred[i]), "peak_true": _peak(maps_true[i])})
    name = "Grad-CAM++" if method == "gradcam++" else "Grad-CAM"
    fig.suptitle(f"{name} at {model.cam_layer_name()}: per image, predicted class | true class "
                 f"(green = correct, red = wrong)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (1.85 * n_rows + 0.5)))
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return {"method": method, "layer": model.cam_layer_name(), "seed": seed, "images": shown}


def _peak(cam: np.ndarray) -> List[int]:
    """(row, column) of a map's maximum, for explain.json."""
    r, c = np.unravel_index(int(cam.argmax()), cam.shape)
    return [int(r), int(c)]


def cam_peaks(maps: torch.Tensor) -> np.ndarray:
    """(B, 2) (row, column) of each (B, H, W) map's maximum."""
    b, h, w = maps.shape
    flat = maps.reshape(b, -1).argmax(1)
    return torch.stack([flat // w, flat % w], 1).cpu().numpy()

