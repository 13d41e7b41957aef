"""Boxes around a YOLO network: letterbox the input, filter + NMS the output, map back.

Darknet feeds its network a "letterboxed" image: resized to fit the square input with the
aspect ratio kept, centred, the rest filled with grey 0.5. The boxes the network returns
are in that square's pixels; ``unletterbox`` undoes the scale and padding so they land in
the original image's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou


@dataclass(frozen=True)
class Letterbox:
    """How an image of ``(height, width)`` was placed into the square network input."""

    scale: float
    pad_x: float
    pad_y: float
    height: int
    width: int


def letterbox(image_rgb: np.ndarray, size: int) -> Tuple[torch.Tensor, Letterbox]:
    """Resize an ``(H, W, 3)`` uint8 RGB image into a ``(1, 3, size, size)`` float tensor.

    The image keeps its aspect ratio, is centred, and the border is 0.5 grey as in
    darknet's ``letterbox_image``; values are in [0, 1]. Returns the tensor and the
    ``Letterbox`` needed to map boxes back.
    """
    import cv2

    height, width = image_rgb.shape[:2]
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR if scale < 1 else cv2.INTER_CUBIC)
    canvas = np.full((size, size, 3), 127, dtype=np.uint8)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    tensor = torch.from_numpy(canvas).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)  # (1, 3, S, S)
    # The true scales differ slightly from `scale` after rounding; the mean is close enough
    # (< 0.5 px error) and keeps the mapping one number.
    return tensor, Letterbox(scale=scale, pad_x=pad_x, pad_y=pad_y, height=height, width=width)


def postprocess(
    raw: torch.Tensor, conf: float, iou: float, max_detections: int = 300
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn one image's raw rows ``(N, 5+C)`` into kept (boxes, scores, class ids).

    Score = objectness x class probability, as darknet reports; every (box, class) pair
    over ``conf`` is a candidate (a box may be both "dog" and "cat"), then class-wise NMS
    (``torchvision.ops.batched_nms``) at IoU ``iou``. Boxes come out as x1, y1, x2, y2 in
    network-input pixels, ``(K, 4)``, sorted by score.
    """
    centre, size = raw[:, 0:2], raw[:, 2:4]
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)  # (N, 4)
    scores = raw[:, 4:5] * raw[:, 5:]  # (N, C)
    rows, classes = torch.nonzero(scores > conf, as_tuple=True)
    boxes, scores = boxes[rows], scores[rows, classes]
    keep = batched_nms(boxes, scores, classes, iou)[:max_detections]
    return boxes[keep], scores[keep], classes[keep]


def unletterbox(boxes: torch.Tensor, placement: Letterbox) -> torch.Tensor:
    """Map ``(K, 4)`` x1, y1, x2, y2 boxes from network-input pixels to the original image.

    Removes the padding, divides by the scale and clips to the image, so a box never
    reaches outside the frame it is drawn on.
    """
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - placement.pad_x) / placement.scale).clamp(0, placement.width)
    out[:, [1, 3]] = ((out[:, [1, 3]] - placement.pad_y) / placement.scale).clamp(0, placement.height)
    return out


def iou(box_a: List[float], box_b: List[float]) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes (plain lists)."""
    return float(box_iou(torch.tensor([box_a], dtype=torch.float32), torch.tensor([box_b], dtype=torch.float32))[0, 0])
