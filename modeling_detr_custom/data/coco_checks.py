"""Up-front checks of a COCO split: every image probed, every annotation cleaned, all of it counted.

Bad data is found before training, never in the middle of an epoch: every image header is opened
(``PIL.Image.open`` + ``verify``), boxes are read in their declared format (COCO xywh unless ``box_format`` says
otherwise; numbers that look like another format are an error, :mod:`.box_format`), clipped to their image and
boxes without area dropped (the rule of :mod:`.boxes`), and each split gets a report of what was fixed or skipped
(see :data:`REPORT_KEYS`).
With ``raise_on_bad`` the first missing/corrupt image, unknown category or orphan annotation raises ValueError.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..image_processing_detr_custom import HIGH_BIT_DEPTH_FULL_SCALE
from .box_format import check_box_format, to_xyxy
from .boxes import clip_to_image, has_area, xyxy_to_xywh

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112

REPORT_KEYS: tuple[str, ...] = (
    "images",  # images listed in the annotation file
    "images_kept",
    "missing_images",  # file absent: skipped (ValueError with on_bad_data="raise")
    "corrupt_images",  # PIL cannot open/verify it: skipped (ValueError with "raise")
    "size_mismatch_images",  # file size differs from the json width/height: skipped ("raise": error)
    "exif_rotated_images",  # kept; stored re-encoded WITHOUT the rotation (COCO boxes are in raw pixels)
    "high_bit_depth_images",  # kept; 16-bit / float grayscale, scaled to 8 bits when decoded (pil_to_rgb8)
    "images_without_annotations",  # kept: valid negative images
    "annotations",  # annotations listed in the file
    "annotations_kept",
    "crowd_annotations",  # kept with iscrowd=1 (training drops them, COCO eval ignores them)
    "boxes_clipped",  # box partly outside the image: clipped to it
    "zero_area_boxes_dropped",  # w or h <= 0 after clipping
    "invalid_bbox_dropped",  # not 4 finite numbers
    "unknown_category_dropped",  # category_id not in "categories" ("raise": error)
    "orphan_annotations_dropped",  # image_id not among the kept images ("raise" if the id is unknown)
)


def empty_report() -> dict[str, int]:
    return {k: 0 for k in REPORT_KEYS}


def _bad(raise_on_bad: bool, message: str) -> None:
    """Raise for bad data in "raise" mode; in "skip" mode the report counts it instead."""
    if raise_on_bad:
        raise ValueError(f"bad data: {message} (use on_bad_data='skip' to skip and count such items)")
    logger.debug("skipping bad data: %s", message)


# ----------------------------------------------------------------------------- images


@dataclass
class ImageInfo:
    """A usable image: where it is and its stored size in pixels (before any EXIF rotation)."""

    path: Path
    width: int
    height: int
    exif_rotated: bool


def _probe_image(path: Path, full_decode: bool) -> tuple[str, int, int, bool, bool]:
    """(status, width, height, exif_rotated, high_bit_depth); status is "ok", "missing" or "corrupt".

    Reads only the header (plus PIL's ``verify``) unless ``full_decode``: cheap enough for COCO.
    """
    if not path.is_file():
        return "missing", 0, 0, False, False
    try:
        with Image.open(path) as im:
            width, height = im.size
            rotated = _exif_rotated(im.info.get("exif"))
            high_bit_depth = im.mode in HIGH_BIT_DEPTH_FULL_SCALE
            im.verify()
        if full_decode:  # verify() does not catch truncated JPEGs; a full decode does
            with Image.open(path) as im:
                im.load()
    except Exception:  # noqa: BLE001 - any failure to read means "corrupt"
        return "corrupt", 0, 0, False, False
    return "ok", width, height, rotated, high_bit_depth


def _exif_rotated(exif_bytes: bytes | None) -> bool:
    """True if the EXIF block asks for a rotation/flip (``datasets.Image`` would apply it).

    Parsed from the header bytes in ``im.info``: ``im.getexif()`` decodes whole PNGs and
    breaks the following ``verify()``.
    """
    if not exif_bytes:
        return False
    exif = Image.Exif()
    exif.load(exif_bytes)
    return exif.get(_EXIF_ORIENTATION) not in (None, 1)


def _resolve_image_path(image_dir: Path, file_name: str) -> Path:
    path = image_dir / file_name
    if not path.exists() and (image_dir.parent / file_name).exists():  # "images/x.jpg"-style names
        return image_dir.parent / file_name
    return path


def check_images(images: list[dict], image_dir: Path, full_decode: bool, report: dict,
                 raise_on_bad: bool) -> dict[int, ImageInfo]:
    """Probe every listed image (threads: it is I/O); return the usable ones by image id."""
    paths = [_resolve_image_path(image_dir, img["file_name"]) for img in images]
    workers = min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        probes = list(pool.map(lambda p: _probe_image(p, full_decode), paths))
    kept: dict[int, ImageInfo] = {}
    for img, path, (status, w, h, rotated, high_bit_depth) in zip(images, paths, probes):
        if status == "ok" and (img.get("width", w), img.get("height", h)) != (w, h):
            status = "size_mismatch"
        if status != "ok":
            report[f"{status}_images"] += 1
            _bad(raise_on_bad, f"image {img['id']} ({path}): {status.replace('_', ' ')}")
            continue
        report["exif_rotated_images"] += int(rotated)
        report["high_bit_depth_images"] += int(high_bit_depth)
        kept[int(img["id"])] = ImageInfo(path, w, h, rotated)
    return kept


# ----------------------------------------------------------------------------- annotations


def clean_annotations(
    annotations: list[dict], images: dict[int, ImageInfo], listed_ids: set[int],
    cat_to_label: dict[int, int], report: dict, raise_on_bad: bool, box_format: str = "xywh",
    where: str = "annotations",
) -> dict[int, list[dict]]:
    """Group usable annotations by image id; clip, drop and count the rest (see REPORT_KEYS).

    Annotations are checked one by one (so "raise" mode stops at the first bad one in file order), then the
    boxes of all of them are read as ``box_format`` (:mod:`.box_format`: ValueError naming ``where`` when their
    numbers look like another format), converted, clipped and dropped at once.
    """
    usable = [ann for ann in annotations if _known_image_and_category(ann, images, listed_ids, cat_to_label,
                                                                      report, raise_on_bad)]
    parsed = [(ann, box) for ann in usable if (box := _parse_box(ann.get("bbox"), report)) is not None]
    owners = [images[int(ann["image_id"])] for ann, _ in parsed]
    boxes, keep = _clip_boxes([box for _, box in parsed], owners, report, box_format, where)
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for (ann, _), box, kept in zip(parsed, boxes, keep):
        if kept:
            by_image[int(ann["image_id"])].append(_object_row(ann, box, cat_to_label[int(ann["category_id"])]))
    return by_image


def _known_image_and_category(ann: dict, images: dict[int, ImageInfo], listed_ids: set[int],
                              cat_to_label: dict[int, int], report: dict, raise_on_bad: bool) -> bool:
    """False (counted, or raised) for an annotation of a skipped or unknown image or an unknown category."""
    try:
        image_id, cat = int(ann["image_id"]), int(ann["category_id"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"annotation {ann!r:.200} needs integer 'image_id' and 'category_id'") from err
    if image_id not in images:
        report["orphan_annotations_dropped"] += 1
        _bad(raise_on_bad and image_id not in listed_ids, f"annotation {ann.get('id')}: unknown image_id {image_id}")
        return False
    if cat not in cat_to_label:
        report["unknown_category_dropped"] += 1
        _bad(raise_on_bad, f"annotation {ann.get('id')}: category_id {cat} not in 'categories'")
        return False
    return True


def _parse_box(bbox: Any, report: dict) -> tuple[float, float, float, float] | None:
    """A ``bbox`` (COCO ``[x, y, w, h]`` unless declared otherwise) as 4 finite floats, or None (counted as
    ``invalid_bbox_dropped``)."""
    try:
        box = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        report["invalid_bbox_dropped"] += 1
        return None
    return box


def _clip_boxes(boxes: list[tuple[float, ...]], images: list[ImageInfo], report: dict, box_format: str,
                where: str) -> tuple[list[list[float]], list[bool]]:
    """(COCO [x, y, w, h] boxes clipped to their image, which have area); counts clipped and dropped boxes.

    The format is recognised before the clip, which would hide the evidence (xyxy corners read as xywh end past
    the image). float64, so the stored float32 values are those of plain Python arithmetic on the json numbers.
    """
    raw = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    width = torch.tensor([float(i.width) for i in images], dtype=torch.float64)
    height = torch.tensor([float(i.height) for i in images], dtype=torch.float64)
    check_box_format(raw, width, height, box_format, where)
    xyxy = to_xyxy(raw, box_format, width, height)
    clipped = clip_to_image(xyxy, width, height)
    keep = has_area(clipped)
    report["zero_area_boxes_dropped"] += int((~keep).sum())
    report["boxes_clipped"] += int(((clipped != xyxy).any(dim=1) & keep).sum())
    return xyxy_to_xywh(clipped).tolist(), keep.tolist()


def _object_row(ann: dict, box: list[float], label: int) -> dict:
    """One entry of a row's ``objects`` (dataset schema: ``category`` is the model class id)."""
    iscrowd = int(ann.get("iscrowd", 0))
    area = float(ann["area"]) if ann.get("area") is not None else box[2] * box[3]
    return {"id": int(ann.get("id", -1)), "area": area, "bbox": box, "category": label, "iscrowd": iscrowd}


# ----------------------------------------------------------------------------- report


def finish_report(report: dict[str, int], by_image: dict[int, list[dict]]) -> None:
    report["images_kept"] = len(by_image)
    report["images_without_annotations"] = sum(1 for objs in by_image.values() if not objs)
    report["annotations_kept"] = sum(len(objs) for objs in by_image.values())
    report["crowd_annotations"] = sum(o["iscrowd"] for objs in by_image.values() for o in objs)


def log_report(name: str, report: dict[str, int]) -> None:
    """One line per split: a warning when anything was dropped or skipped, else info."""
    totals = ("images", "images_kept", "annotations", "annotations_kept")
    skipped = {k: v for k, v in report.items() if v and k not in totals}
    dropped = ("_dropped", "missing_images", "corrupt_images", "size_mismatch_images")
    level = logging.WARNING if any(k.endswith(dropped) for k in skipped) else logging.INFO
    logger.log(level, "split %s: kept %d/%d images, %d/%d annotations; %s", name, report["images_kept"],
               report["images"], report["annotations_kept"], report["annotations"], skipped or "no bad data")
