"""The one box conversion and the one clip-to-image / drop-empty rule of the data tooling.

Boxes are ``(n, 4)`` tensors in ABSOLUTE pixels, in one of two formats:

* COCO ``xywh``: ``(x, y, w, h)``, top-left corner plus size (dataset rows, COCO json, the processor's input);
* ``xyxy``: ``(x0, y0, x1, y1)``, top-left and bottom-right corners (what augmentation works in).

:func:`cxcywh_to_xyxy` also reads centre-size boxes (a declared ``--box_format``, model targets), in any units.

Every function keeps the dtype it is given, so callers choose the precision: the COCO loader works in float64
(what Python floats gave before), training targets in float32. The image processor applies the same rule to the
annotations it is given (clip to the image, drop boxes without area); it is remote code and keeps its own copy.
"""

from __future__ import annotations

import torch
from torch import Tensor


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """boxes: (n, 4) absolute pixel COCO (x, y, w, h) -> (n, 4) absolute pixel (x0, y0, x1, y1)."""
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """boxes: (n, 4) absolute pixel (x0, y0, x1, y1) -> (n, 4) absolute pixel COCO (x, y, w, h)."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """boxes: (n, 4) (cx, cy, w, h) -> (n, 4) (x0, y0, x1, y1), in the same units (pixels or normalised)."""
    return torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)


def clip_to_image(boxes: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """Clip boxes to the image ``[0, width] x [0, height]``.

    Args:
        boxes: (n, 4) absolute pixel (x0, y0, x1, y1).
        width, height: the image size in pixels, one number or (n,) per box.

    Returns (n, 4) absolute pixel (x0, y0, x1, y1); NaN coordinates stay NaN (:func:`has_area` drops them).
    """
    n = boxes.shape[0]
    width = torch.as_tensor(width, dtype=boxes.dtype).expand(n)
    height = torch.as_tensor(height, dtype=boxes.dtype).expand(n)
    limits = torch.stack([width, height, width, height], dim=1)
    return torch.minimum(boxes.clamp(min=0), limits)


def has_area(boxes: Tensor) -> Tensor:
    """(n,) bool: True where a box of (n, 4) absolute (x0, y0, x1, y1) has positive width AND height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def box_area(boxes: Tensor) -> Tensor:
    """(n,) ``w * h`` in square pixels of (n, 4) absolute (x0, y0, x1, y1) boxes."""
    return (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
