"""The one data check of every source (COCO folder, Hub or saved dataset, YOLO folder): what each split holds, and
what would make a run wrong or crash, found up-front from the annotations alone (no image is decoded).

Training runs it before any step, evaluation before any prediction, ``scripts/inspect_data.py`` alone; all three
through :func:`check_dataset`, which reads each split's boxes from its Arrow columns (:func:`.schema.box_columns`)
and returns the data to use with a :class:`DataReport` (``report.log()``). It

* reports, per split: images, boxes (the usable ones: clipped to the image, with area, not crowd, as training uses
  them), boxes per class, the most boxes in one image (against ``num_queries``), box sizes in pixels (min / median /
  max of ``sqrt(w * h)``) and how many boxes are smaller than one backbone stride cell on both sides once their image
  is resized to the model's input size, images without boxes, and what the loader fixed or skipped;
* refuses, in one line (ValueError): a split whose class names differ from the labels' (both lists named); a model
  whose labels differ from the data's (``model_labels``, both named: in evaluation every label of the data must have
  the same id in the model; in fine-tuning the same names in another order are refused, a new label set is not); a
  split without any usable box (unless ``allow_empty``); an image of ``train_split`` with more usable boxes than
  ``num_queries`` (named, with its count: DETR matches each box to its own query);
* skips and counts (refuses with ``on_bad_data="raise"``) the images that one of the run's ``resizes`` would bring to
  a side of 0 pixels, or to more pixels than PIL decodes (twice ``PIL.Image.MAX_IMAGE_PIXELS``: over it, decoding
  raises DecompressionBombError); both would otherwise crash or blank an image in the middle of an epoch. The stored
  image is held to the same limit. Without ``width`` / ``height`` columns these checks cannot run (the report says).

Boxes given in another format than the declared one are found by the loaders, on the numbers before any clip
(:mod:`.box_format`); a YOLO folder's pixel coordinates by the YOLO reader.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from datasets import DatasetDict
from PIL import Image

from ..image_processing_detr_custom import get_size_with_aspect_ratio
from .boxes import clip_to_image, has_area, xywh_to_xyxy
from .schema import BoxColumns, DetectionData, box_columns, category_feature

logger = logging.getLogger(__name__)

_LOADER_TOTALS = ("images", "images_kept", "annotations", "annotations_kept")
SKIP_KEYS = ("resize_to_zero_images", "too_large_images")


@dataclass(frozen=True)
class CheckSettings:
    """What the data is checked against.

    Attributes:
        num_queries: the model's queries per image (None: not checked); stride: its backbone's output stride.
        resizes: every (short side, long-side limit or None) an image goes through, the model's input size first
            (training with augmentation adds its smallest and largest scales and the crop branch's resizes).
        train_split: the split whose images may not hold more than ``num_queries`` boxes (None: evaluation).
        allow_empty: a split without any usable box is a warning instead of an error.
        on_bad_data: ``"skip"`` (counted) or ``"raise"`` for images the resizes cannot handle.
        model_labels: the id2label of the model the data goes with (None: a new model); ``model_name`` names it.
        fine_tuning: compare the model's labels as fine-tuning does (refuse only the same names in another
            order) instead of as evaluation does (every data label under the same id in the model).
    """

    num_queries: int | None = None
    stride: int | None = None
    resizes: tuple[tuple[int, int | None], ...] = ()
    train_split: str | None = None
    allow_empty: bool = False
    on_bad_data: str = "skip"
    model_labels: Mapping[int, str] | None = None
    model_name: str = "the model"
    fine_tuning: bool = False


@dataclass(frozen=True)
class SplitSummary:
    """What one split holds (module docstring); sizes in pixels of the stored images."""

    name: str
    images: int
    boxes: int
    boxes_per_class: dict[str, int]
    max_boxes: int  # in one image
    busiest_image: int | None  # image_id of the first image with max_boxes
    box_sizes: tuple[float, float, float] | None  # min, median, max of sqrt(w * h); None without boxes
    boxes_under_stride: int | None  # None when the stride or the image sizes are unknown
    images_without_boxes: int
    loader: dict[str, int] = field(default_factory=dict)  # what the loader fixed or skipped (nonzero counts)
    skipped: dict[str, int] = field(default_factory=dict)  # what this check skipped (SKIP_KEYS, nonzero)
    sizes_known: bool = True


@dataclass(frozen=True)
class DataReport:
    """The check's findings per split, with the settings it compared them to."""

    splits: dict[str, SplitSummary]
    settings: CheckSettings

    def lines(self) -> list[str]:
        """One line per split."""
        return [_describe(s, self.settings) for s in self.splits.values()]

    def log(self, log: logging.Logger | None = None) -> None:
        """Each split's line: a warning when images were skipped, else info."""
        for summary, line in zip(self.splits.values(), self.lines()):
            (log or logger).log(logging.WARNING if summary.skipped else logging.INFO, "%s", line)


# ----------------------------------------------------------------------------- the check


def check_dataset(data: DetectionData, splits: Sequence[str], settings: CheckSettings
                  ) -> tuple[DetectionData, DataReport]:
    """Check ``splits`` of ``data`` (module docstring): (the data without the skipped images, the report).

    Raises ValueError (one line, naming the split, the value and what was expected) for what would make a run
    wrong or crash."""
    check_class_names(data, splits)
    if settings.model_labels is not None:
        check_model_labels(data.label_mapping.id2label, settings.model_labels, settings.model_name,
                           settings.fine_tuning)
    checked, summaries = dict(data.dataset), {}
    for name in splits:
        checked[name], summaries[name] = check_split(name, data.dataset[name], data.report.get(name, {}), settings)
    return dataclasses.replace(data, dataset=DatasetDict(checked)), DataReport(summaries, settings)


def check_class_names(data: DetectionData, splits: Sequence[str]) -> None:
    """ValueError naming both lists when a split's ClassLabel names differ from the labels' (the first split's)."""
    first = next(iter(data.dataset))
    for name in splits:
        names = getattr(category_feature(data.dataset[name].features), "names", None)
        if names is not None and list(names) != list(data.label_mapping.names):
            raise ValueError(f"split {name!r} has the class names {list(names)} but the labels (from split {first!r}) "
                             f"are {list(data.label_mapping.names)}; the same id would mean another class in each "
                             "split: give every split the same ClassLabel (dataset.cast_column('objects', ...))")


def _real_labels(id2label: Mapping[Any, str]) -> dict[int, str]:
    """id -> name without the "N/A" gaps of raw COCO ids."""
    return {int(i): str(n) for i, n in id2label.items() if not str(n).startswith("N/A")}


def check_model_labels(data_labels: Mapping[Any, str], model_labels: Mapping[Any, str], model_name: str,
                       fine_tuning: bool) -> None:
    """ValueError naming both label lists when the data and the model disagree (see :class:`CheckSettings`)."""
    data, model = _real_labels(data_labels), _real_labels(model_labels)
    if fine_tuning:
        if sorted(data.values()) != sorted(model.values()) or data == model:
            return  # the same labels, or a new label set (its class head is replaced)
        problem = "has the model's classes under other ids"
        # fine-tuning would keep every class-head row (at its new index), but the same names under other ids are
        # more likely data loaded with other ids than the model's (--contiguous_labels) than a wanted reordering
        fix = "load the data with the ids the model was trained with"
    else:
        if all(model.get(i) == n for i, n in data.items()):
            return
        problem = "has labels the model names otherwise"
        fix = "predictions would be scored against the wrong classes"
    raise ValueError(f"the dataset {problem}: data {data} vs {model_name} {model}; {fix} (the same "
                     "--contiguous_labels, the same class order)")


def check_split(name: str, ds: datasets.Dataset, loader_report: Mapping[str, int], settings: CheckSettings
                ) -> tuple[datasets.Dataset, SplitSummary]:
    """One split: (its rows without the skipped images, its summary); ValueError for what cannot run."""
    columns = box_columns(ds, f"split {name!r}")
    skip = unusable_images(columns, settings.resizes)
    if skip:
        _refuse_or_count(name, ds, columns, skip, settings.on_bad_data)
        ds = ds.select(np.setdiff1d(np.arange(len(ds)), np.concatenate(list(skip.values()))).tolist())
        columns = box_columns(ds, f"split {name!r}")
    stats = BoxStats.of(columns)
    summary = summarise(name, columns, stats, ds, loader_report, {k: len(v) for k, v in skip.items()}, settings)
    _refuse_empty(summary, settings)
    _refuse_crowded(summary, ds, stats, settings)
    return ds, summary


# ----------------------------------------------------------------------------- images the run cannot resize


def unusable_images(columns: BoxColumns, resizes: Sequence[tuple[int, int | None]]) -> dict[str, np.ndarray]:
    """Rows (sorted indices) by skip reason (``SKIP_KEYS``; only reasons with rows): images some resize brings to a
    side of 0 px, or to more pixels than PIL decodes. A loose vectorised bound picks the candidates, the processor's
    own size arithmetic (`get_size_with_aspect_ratio`) decides, once per distinct size among them."""
    if columns.widths is None or columns.heights is None:
        return {}
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    candidates = np.nonzero(_may_fail(columns.heights, columns.widths, resizes, limit))[0]
    if not len(candidates):
        return {}
    sizes = np.stack([columns.heights[candidates], columns.widths[candidates]], axis=1)
    distinct, inverse = np.unique(sizes, axis=0, return_inverse=True)
    verdicts = np.array([_resize_problem(int(h), int(w), resizes, limit) for h, w in distinct], dtype=object)
    per_row = verdicts[inverse.reshape(-1)]
    return {key: candidates[rows] for key in SKIP_KEYS if len(rows := np.nonzero(per_row == key)[0])}


def _may_fail(heights: np.ndarray, widths: np.ndarray, resizes: Sequence[tuple[int, int | None]],
              limit: int | None) -> np.ndarray:
    """(m,) bool, True for every image a resize may bring to 0 px or past ``limit`` pixels (and some that it does
    not): a resize to short side ``s`` gives at most ``s x (s * aspect + 1)`` pixels, and a short side under 1 px only
    when its long-side limit ``L`` is below half the aspect ratio (a bound of 2 leaves room for the rounding)."""
    short, long = np.minimum(heights, widths), np.maximum(heights, widths)
    aspect = long / np.maximum(short, 1)
    maybe = (short < 1) | (heights * widths > (limit or np.inf))
    for side, long_limit in resizes:
        if long_limit is not None:
            maybe |= long_limit / aspect < 2
        if limit is not None:
            maybe |= side * (side * aspect + 1) > limit
    return maybe


def _resize_problem(height: int, width: int, resizes: Sequence[tuple[int, int | None]], limit: int | None
                    ) -> str | None:
    """The SKIP_KEYS reason of an image of this size, or None when every resize gives a usable image."""
    outputs = [(height, width)] + [get_size_with_aspect_ratio((height, width), short, long) if min(height, width) > 0
                                   else (0, 0) for short, long in resizes]
    if any(min(h, w) < 1 for h, w in outputs):
        return "resize_to_zero_images"
    if limit is not None and any(h * w > limit for h, w in outputs):
        return "too_large_images"
    return None


def _image_name(ds: datasets.Dataset, row: int) -> str:
    """``image <id> (<path>)`` of a row, read without decoding the image."""
    one = ds.select([row])
    if "image" in one.column_names:
        one = one.cast_column("image", datasets.Image(decode=False))
    record = one[0]
    path = (record.get("image") or {}).get("path")
    return f"image {record.get('image_id', row)}" + (f" ({path})" if path else "")


def _refuse_or_count(name: str, ds: datasets.Dataset, columns: BoxColumns, skip: Mapping[str, np.ndarray],
                     on_bad_data: str) -> None:
    """ValueError naming the first unusable image with ``on_bad_data="raise"``, else a warning with the counts."""
    counts = {k: len(v) for k, v in skip.items()}
    first = min(int(rows[0]) for rows in skip.values())
    what = f"{_image_name(ds, first)}: {columns.widths[first]:.0f}x{columns.heights[first]:.0f} px"
    if on_bad_data == "raise":
        raise ValueError(f"bad data: split {name!r}: {what} cannot be resized to the model's input sizes (a side of 0 "
                         f"px, or over PIL's {Image.MAX_IMAGE_PIXELS} pixel limit): {counts} (use on_bad_data='skip' "
                         "to skip and count such images)")
    logger.warning("split %s: skipping images the run cannot resize (a side of 0 px, or over PIL's pixel limit): %s; "
                   "the first: %s", name, counts, what)


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class BoxStats:
    """The usable boxes of a split (clipped to their image, with area, not crowd: what training uses)."""

    keep: np.ndarray  # (n,) bool over every stored box
    sizes: np.ndarray  # (k, 2) w, h in pixels of the kept boxes
    owners: np.ndarray  # (k,) row of each kept box
    per_image: np.ndarray  # (m,) kept boxes per row

    @classmethod
    def of(cls, columns: BoxColumns) -> BoxStats:
        xyxy = xywh_to_xyxy(torch.from_numpy(columns.boxes))
        if columns.widths is not None and columns.heights is not None:
            owners = columns.owners
            xyxy = clip_to_image(xyxy, torch.from_numpy(columns.widths[owners]),
                                 torch.from_numpy(columns.heights[owners]))
        keep = has_area(xyxy).numpy() & (columns.iscrowd == 0)
        xyxy = xyxy.numpy()[keep]
        owners = columns.owners[keep]
        return cls(keep, xyxy[:, 2:] - xyxy[:, :2], owners, np.bincount(owners, minlength=len(columns.counts)))


def _input_scale(columns: BoxColumns, resizes: Sequence[tuple[int, int | None]]) -> np.ndarray | None:
    """(m,) factor from each stored image to the model's input size (the first resize: short side ``s``, long side
    at most ``L``), up to the processor's rounding to whole pixels: ``min(s / short, L / long)``; None if unknown."""
    if not resizes or columns.widths is None or columns.heights is None:
        return None
    side, long_limit = resizes[0]
    short = np.maximum(np.minimum(columns.widths, columns.heights), 1)
    long = np.maximum(columns.widths, columns.heights)
    return np.minimum(side / short, (long_limit or np.inf) / np.maximum(long, 1))


def _under_stride(columns: BoxColumns, stats: BoxStats, settings: CheckSettings) -> int | None:
    """Kept boxes whose both sides are under one stride cell at the model's input size (None if unknown)."""
    scale = _input_scale(columns, settings.resizes)
    if scale is None or not settings.stride:
        return None
    return int((stats.sizes * scale[stats.owners, None] < settings.stride).all(axis=1).sum())


def summarise(name: str, columns: BoxColumns, stats: BoxStats, ds: datasets.Dataset,
              loader_report: Mapping[str, int], skipped: Mapping[str, int], settings: CheckSettings) -> SplitSummary:
    """The :class:`SplitSummary` of one split's columns."""
    sides = np.sqrt(stats.sizes.prod(axis=1))
    names = getattr(category_feature(ds.features), "names", None) or []
    per_class = np.bincount(columns.categories[stats.keep]) if len(sides) else np.zeros(0, np.int64)
    busiest = int(stats.per_image.argmax()) if len(stats.per_image) else None
    return SplitSummary(
        name, len(columns.counts), len(sides),
        {(names[c] if c < len(names) else str(c)): int(n) for c, n in enumerate(per_class) if n},
        int(stats.per_image.max(initial=0)), None if busiest is None else int(columns.image_ids[busiest]),
        (float(sides.min()), float(np.median(sides)), float(sides.max())) if len(sides) else None,
        _under_stride(columns, stats, settings), int((stats.per_image == 0).sum()),
        {k: int(v) for k, v in loader_report.items() if v and k not in _LOADER_TOTALS},
        {k: int(v) for k, v in skipped.items() if v}, columns.widths is not None)


def _refuse_empty(summary: SplitSummary, settings: CheckSettings) -> None:
    """A split without any usable box: an error, or a warning with ``allow_empty``."""
    if summary.boxes:
        return
    message = (f"split {summary.name!r} has no usable box in its {summary.images} images (loader: "
               f"{summary.loader or 'no bad data'}); a detector cannot learn or be scored on it")
    if not settings.allow_empty:
        hint = "" if settings.train_split else " (--allow_empty_split evaluates it anyway)"
        raise ValueError(message + hint)
    logger.warning("%s; evaluating it anyway (--allow_empty_split)", message)


def _refuse_crowded(summary: SplitSummary, ds: datasets.Dataset, stats: BoxStats, settings: CheckSettings) -> None:
    """Images with more usable boxes than queries: an error in the training split, a warning elsewhere."""
    if not settings.num_queries or summary.max_boxes <= settings.num_queries:
        return
    per_image = stats.per_image
    crowded = np.nonzero(per_image > settings.num_queries)[0]
    first = int(crowded[per_image[crowded].argmax()])
    message = (f"split {summary.name!r}: {_image_name(ds, first)} has {per_image[first]} boxes, more than the model's "
               f"{settings.num_queries} queries (num_queries), and {len(crowded)} image(s) have more than "
               f"{settings.num_queries}")
    if summary.name == settings.train_split:
        raise ValueError(f"{message}; DETR matches each box to its own query: raise num_queries (--config_overrides "
                         f"num_queries={int(per_image.max())} for a new model)")
    logger.warning("%s: at most %d of their boxes can be detected", message, settings.num_queries)


# ----------------------------------------------------------------------------- the report line


def _describe(s: SplitSummary, settings: CheckSettings) -> str:
    """One line: ``data <split>: ...`` (the module docstring's numbers)."""
    classes = ", ".join(f"{k} {v}" for k, v in s.boxes_per_class.items()) or "none"
    queries = f" (num_queries {settings.num_queries})" if settings.num_queries else ""
    parts = [f"data {s.name}: {s.images} images ({s.images_without_boxes} without boxes), {s.boxes} boxes "
             f"({classes}); at most {s.max_boxes} in one image{queries}"]
    if s.box_sizes:
        parts.append("box size sqrt(w*h) min/median/max {:.1f}/{:.1f}/{:.1f} px".format(*s.box_sizes))
    if s.boxes_under_stride is not None:
        parts.append(f"{s.boxes_under_stride} boxes smaller than one stride cell ({settings.stride} px at input size "
                     f"{settings.resizes[0][0]})")
    if not s.sizes_known:
        parts.append("image sizes unknown (no width/height columns): resize checks not run")
    parts.append(f"loader: {s.loader or 'no bad data'}")
    if s.skipped:
        parts.append(f"skipped by the check: {s.skipped}")
    return "; ".join(parts)


__all__ = ["BoxStats", "CheckSettings", "DataReport", "SKIP_KEYS", "SplitSummary", "check_class_names", "check_dataset",
           "check_model_labels", "check_split", "summarise", "unusable_images"]
