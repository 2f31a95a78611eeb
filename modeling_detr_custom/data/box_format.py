"""The box formats a source may declare (``--box_format``), their conversion to the rows' COCO ``[x, y, w, h]``
pixels, and the recognition of boxes given in another format than the declared one.

Formats: ``xywh`` (COCO's), ``xyxy`` (corners, Pascal VOC's) and ``cxcywh`` (centre and size) in absolute pixels,
and the same three normalised to [0, 1] by the image width and height (``*_normalized``; ``cxcywh_normalized`` is
YOLO's). COCO json is ``xywh`` by definition and Hub / saved datasets are expected in it (:mod:`.schema`), but
files in another format exist: declare it and the loader converts (:func:`to_xywh`, with :mod:`.boxes`).

Recognition (:func:`check_box_format`) works on the numbers as the source gives them, before any clip, from their
own statistics; a finding names the likely format, how many boxes it rests on, and the ``--box_format`` to pass:

* a box FITS a format when, read in it, it has positive width and height and lies inside its image, with
  ``1 px + 1%`` of the side as slack (tools round and overshoot by a pixel). Another format is named when at least
  ``MIN_BOXES`` boxes and ``WRONG_SHARE`` (20%) of them do not fit the declared format while ``RIGHT_SHARE`` (98%)
  fit the other. Corners read as COCO xywh end past the image whenever ``x0 + x1 > width``, about half the boxes,
  yet nearly all fit as xyxy; real xywh data with a few border-crossing boxes stays far under 20%, and hardly ever
  fits another format at 98% (that needs almost every box near the top-left corner).
* normalised numbers read as pixels fit (tiny boxes in the top-left corner), so they are found by size: at least
  ``MIN_BOXES`` and ``NORMALISED_SHARE`` (90%) of the boxes of images of ``MIN_IMAGE_SIDE`` px or more have all four
  numbers within [0, 1].

Fewer than ``MIN_BOXES`` boxes in a split give no finding: a handful of boxes proves nothing.
Without image sizes (a Hub dataset without ``width`` / ``height``) only the size rule runs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .boxes import cxcywh_to_xyxy, has_area, xywh_to_xyxy, xyxy_to_xywh

BoxFormat = Literal["xywh", "xyxy", "cxcywh", "xywh_normalized", "xyxy_normalized", "cxcywh_normalized"]
BOX_FORMATS: tuple[str, ...] = ("xywh", "xyxy", "cxcywh", "xywh_normalized", "xyxy_normalized", "cxcywh_normalized")
NORMALIZED = "_normalized"

MIN_BOXES = 10  # no finding on fewer boxes
WRONG_SHARE = 0.2  # at least this share of the boxes must not fit the declared format ...
RIGHT_SHARE = 0.98  # ... while at least this share fits the named one
NORMALISED_SHARE = 0.9  # share of boxes with all numbers in [0, 1] that makes pixel boxes look normalised
MIN_IMAGE_SIDE = 8  # px: in smaller images, boxes under 1 px are no evidence


def check_format_name(box_format: str) -> str:
    """``box_format`` itself; ValueError naming the formats when it is none of them."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"--box_format {box_format!r} is not a box format; expected one of {', '.join(BOX_FORMATS)}")
    return box_format


def to_xyxy(boxes: Tensor, box_format: str, width: Tensor | float | None = None,
            height: Tensor | float | None = None) -> Tensor:
    """(n, 4) boxes in ``box_format`` -> (n, 4) absolute pixel (x0, y0, x1, y1), same dtype.

    ``width`` / ``height``: the image size in pixels, one number or (n,) per box; needed by normalised formats.
    """
    base = check_format_name(box_format).removesuffix(NORMALIZED)
    xyxy = {"xywh": xywh_to_xyxy, "cxcywh": cxcywh_to_xyxy, "xyxy": torch.clone}[base](boxes)
    if box_format.endswith(NORMALIZED):
        if width is None or height is None:
            raise ValueError(f"--box_format {box_format} needs each image's width and height")
        n = boxes.shape[0]
        w = torch.as_tensor(width, dtype=boxes.dtype).expand(n)
        h = torch.as_tensor(height, dtype=boxes.dtype).expand(n)
        xyxy = xyxy * torch.stack([w, h, w, h], dim=1)
    return xyxy


def to_xywh(boxes: Tensor, box_format: str, width: Tensor | float | None = None,
            height: Tensor | float | None = None) -> Tensor:
    """(n, 4) boxes in ``box_format`` -> (n, 4) absolute pixel COCO (x, y, w, h) (see :func:`to_xyxy`)."""
    return boxes.clone() if box_format == "xywh" else xyxy_to_xywh(to_xyxy(boxes, box_format, width, height))


def _fits(boxes: Tensor, box_format: str, width: Tensor, height: Tensor) -> Tensor:
    """(n,) bool: the box, read in ``box_format``, has area and lies inside its image (1 px + 1% slack)."""
    xyxy = to_xyxy(boxes, box_format, width, height)
    slack_x, slack_y = 1 + 0.01 * width, 1 + 0.01 * height
    inside = (xyxy[:, 0] >= -slack_x) & (xyxy[:, 1] >= -slack_y) & (xyxy[:, 2] <= width + slack_x) \
        & (xyxy[:, 3] <= height + slack_y)
    return has_area(xyxy) & inside


def _other_format(boxes: Tensor, width: Tensor, height: Tensor, declared: str) -> str | None:
    """The finding of the fit rule (module docstring), or None."""
    n = boxes.shape[0]
    misfits = int((~_fits(boxes, declared, width, height)).sum())
    if misfits < MIN_BOXES or misfits < WRONG_SHARE * n:
        return None
    fits = {f: int(_fits(boxes, f, width, height).sum()) for f in BOX_FORMATS if f != declared}
    best = max(fits, key=lambda f: fits[f])  # ties: the first in BOX_FORMATS
    if fits[best] < RIGHT_SHARE * n:
        return None
    declared_xyxy = to_xyxy(boxes, declared, width, height)
    no_area = int((~has_area(declared_xyxy)).sum())
    why = "have x1 <= x0 or y1 <= y0" if 2 * no_area > misfits else "end past the image"
    return (f"boxes look like {best}, not {declared}: {misfits} of {n} {why} read as {declared}, "
            f"{fits[best]} lie inside it as {best}; pass --box_format {best}")


def _normalised_format(boxes: Tensor, width: Tensor | None, height: Tensor | None, declared: str) -> str | None:
    """The finding of the size rule (module docstring) for pixel formats, or None."""
    if declared.endswith(NORMALIZED):
        return None
    if width is not None:
        big = (width >= MIN_IMAGE_SIDE) & (height >= MIN_IMAGE_SIDE)
        boxes, width, height = boxes[big], width[big], height[big]
    n = boxes.shape[0]
    unit = int(((boxes >= 0) & (boxes <= 1)).all(dim=1).sum())
    if unit < MIN_BOXES or unit < NORMALISED_SHARE * n:
        return None
    base = declared.removesuffix(NORMALIZED)
    if width is None:
        guess = f"one of {', '.join(f for f in BOX_FORMATS if f.endswith(NORMALIZED))}"
    else:
        fits = {f: int(_fits(boxes, f, width, height).sum()) for f in BOX_FORMATS if f.endswith(NORMALIZED)}
        guess = max(fits, key=lambda f: (fits[f], f == base + NORMALIZED))
    return (f"boxes look normalised to [0, 1], not absolute pixels: {unit} of {n} boxes have all four numbers within "
            f"[0, 1] (images of {MIN_IMAGE_SIDE} px or more); pass --box_format {guess}")


def find_box_format(boxes: Tensor, width: Tensor | None, height: Tensor | None, declared: str) -> str | None:
    """What the numbers say when they do not look like ``declared`` (module docstring), else None.

    Args:
        boxes: (n, 4) float64 boxes as the source gives them, in ``declared``'s reading.
        width, height: (n,) the size in pixels of each box's image, or None when unknown.
    """
    if boxes.shape[0] < MIN_BOXES:
        return None
    boxes = boxes.to(torch.float64)
    if width is not None:
        width, height = width.to(torch.float64), height.to(torch.float64)
        finding = _other_format(boxes, width, height, declared)
        if finding:
            return finding
    return _normalised_format(boxes, width, height, declared)


def check_box_format(boxes: Tensor, width: Tensor | None, height: Tensor | None, declared: str, where: str) -> None:
    """ValueError ``"<where>: <finding>"`` when :func:`find_box_format` has a finding."""
    finding = find_box_format(boxes, width, height, declared)
    if finding:
        raise ValueError(f"{where}: {finding}")


__all__ = ["BOX_FORMATS", "BoxFormat", "check_box_format", "check_format_name", "find_box_format", "to_xywh",
           "to_xyxy"]
