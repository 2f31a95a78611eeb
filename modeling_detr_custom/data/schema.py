"""The rows every data source yields, the label mapping, and the names data keeps between stages.

Not remote code: nothing in the model/config/processor files imports this package.

Every source ends up in the schema of the Hub's detection datasets (e.g. ``cppe-5``)::

    image_id: int64
    image:    datasets.Image()                 (decodes to PIL; stored as a path for COCO folders)
    width, height: int32                       (pixels of the stored image, before any EXIF rotation)
    objects:  {"id":       List(int64),
               "area":     List(float32),      (COCO's area: the MASK area when the file has one)
               "bbox":     List(List(float32, length=4)),   ABSOLUTE pixels, COCO [x, y, w, h]
               "category": List(ClassLabel),   the MODEL's class id (see below)
               "iscrowd":  List(int8)}         (only from COCO folders; 1 = crowd region)

The class id has ONE name at each stage boundary:

* dataset rows: ``objects["category"]``, the model's class id (a ClassLabel index);
* augmentation targets (:mod:`.transforms`) and model targets (the processor's ``labels``): ``class_labels``,
  the same model class id;
* COCO json and the COCO metric: ``category_id`` (``category_ids`` for a list), COCO's category id.
  :class:`LabelMapping` converts: ``label_to_category_id`` and ``category_id_to_label``.

The image processor takes COCO-format annotations and copies their ``category_id`` into ``class_labels``
unchanged, so the collator hands it the MODEL class id under that key. With raw COCO ids as labels (the default,
as in the original DETR) the two ids are equal; they differ only with ``contiguous_labels=True``.

Boxes follow one path (conversions and the clip/drop rule live in :mod:`.boxes`): COCO json ``[x, y, w, h]`` ->
clipped to the image, boxes without area dropped -> dataset rows, COCO ``[x, y, w, h]`` -> training target
``(x0, y0, x1, y1)`` (clipped and dropped again, since Hub datasets are not checked) -> augmentation in
``(x0, y0, x1, y1)`` -> the processor's COCO ``[x, y, w, h]`` -> model target ``(cx, cy, w, h)`` normalised by
the unpadded image size.

Label ids: by default COCO's raw category ids are the labels, as in the original DETR (``ClassLabel`` with
``max_id + 1`` names; ids no category uses are named ``"N/A_<id>"`` because ClassLabel names must be unique;
``id2label`` names them ``"N/A"`` like the hub's COCO DETR configs). With ``contiguous_labels=True`` labels are
``0..K-1`` in sorted category-id order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from datasets import ClassLabel, DatasetDict, Features, List, Value


def detection_features(class_names: Sequence[str]) -> Features:
    """The schema above, with ``objects.category`` a ClassLabel over ``class_names``."""
    return Features({
        "image_id": Value("int64"),
        "image": datasets.Image(),
        "width": Value("int32"),
        "height": Value("int32"),
        "objects": {
            "id": List(Value("int64")),
            "area": List(Value("float32")),
            "bbox": List(List(Value("float32"), length=4)),
            "category": List(ClassLabel(names=list(class_names))),
            "iscrowd": List(Value("int8")),
        },
    })


def validate_detection_schema(dataset: datasets.Dataset, name: str = "dataset") -> None:
    """Raise ValueError naming the first missing column of the detection schema."""
    cols = dataset.features
    for col in ("image", "objects"):
        if col not in cols:
            raise ValueError(f"{name} has no {col!r} column (columns: {list(cols)}); "
                             "expected the schema of modeling_detr_custom.data")
    if not isinstance(cols["image"], datasets.Image):
        raise ValueError(f"{name}: column 'image' must be a datasets.Image feature, got {cols['image']!r}")
    objects = cols["objects"]
    sub = objects.feature if hasattr(objects, "feature") else objects  # List({...}) or {...: List}
    for key in ("bbox", "category"):
        if key not in sub:
            raise ValueError(f"{name}: column 'objects' has no {key!r} field (fields: {list(sub)}); "
                             "bbox must be absolute COCO [x, y, w, h] pixels")


# ----------------------------------------------------------------------------- label mapping


@dataclass
class LabelMapping:
    """Model class id <-> COCO category id.

    Attributes:
        names: ClassLabel names, index = model class id (unique; gaps named ``"N/A_<id>"``).
        label_to_category_id: model class id -> original COCO category id (identity for raw ids
            and for datasets without COCO ids); covers only labels that are real categories.
    """

    names: list[str]
    label_to_category_id: dict[int, int]

    @property
    def id2label(self) -> dict[int, str]:
        """For the model config: every class id 0..len(names)-1, gaps named ``"N/A"``."""
        return {i: ("N/A" if i not in self.label_to_category_id else n) for i, n in enumerate(self.names)}

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in self.id2label.items() if i in self.label_to_category_id}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {c: label for label, c in self.label_to_category_id.items()}


def label_mapping_from_categories(categories: Sequence[Mapping[str, Any]],
                                  contiguous_labels: bool = False) -> LabelMapping:
    """Build the mapping from a COCO ``categories`` list (dicts with ``id`` and ``name``)."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids) or (ids and ids[0] < 0):
        raise ValueError(f"COCO categories must have distinct ids >= 0, got {ids}")
    names = _unique_names([str(c["name"]) for c in cats])
    if contiguous_labels:
        return LabelMapping(names, {label: cid for label, cid in enumerate(ids)})
    by_id = dict(zip(ids, names))
    all_names = [by_id.get(i, f"N/A_{i}") for i in range(max(ids, default=-1) + 1)]
    return LabelMapping(all_names, {cid: cid for cid in ids})


def _unique_names(names: list[str]) -> list[str]:
    """ClassLabel refuses duplicate names; suffix repeats with ``_<n>`` (rare in real files)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def category_feature(features: Features) -> Any:
    """The feature of ``objects.category`` (a ClassLabel in this schema), whichever layout ``objects`` has: a
    dict of lists (``{"category": List(ClassLabel)}``) or a list of dicts (``List({"category": ClassLabel})``)."""
    objects = features["objects"]
    category = (objects.feature if isinstance(objects, List) else objects)["category"]
    return getattr(category, "feature", category)


def label_mapping_from_features(features: Features) -> LabelMapping:
    """Identity mapping from a dataset's ``objects.category`` ClassLabel (Hub / saved datasets)."""
    feature = category_feature(features)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"objects.category must be a ClassLabel (its names become id2label), got {feature!r}; "
            "cast it with dataset.cast_column(...)"
        )
    real = {i: i for i, n in enumerate(feature.names) if not n.startswith("N/A")}
    return LabelMapping(list(feature.names), real)


@dataclass
class DetectionData:
    """What the training script needs from any source.

    Attributes:
        dataset: splits in the schema of this module's docstring.
        label_mapping: ``id2label`` for the model config and class id -> COCO category id.
        report: per split, counts of fixed/skipped items (COCO and YOLO folders only; see ``REPORT_KEYS``,
            ``YOLO_REPORT_KEYS``).
        annotation_files: per split, the COCO json (COCO folders only): give it to the COCO
            metric for evaluation exactly against the original ground truth (crowd regions included).
    """

    dataset: DatasetDict
    label_mapping: LabelMapping
    report: dict[str, dict[str, int]] = field(default_factory=dict)
    annotation_files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading rows


def objects_as_columns(objects: Mapping[str, Sequence] | Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """A row's ``objects`` as a dict of lists, whether the dataset stores a dict of lists
    (this package, cppe-5) or a list of dicts (``List({...})`` features). Always has bbox and category."""
    if isinstance(objects, Mapping):
        columns = {k: list(v) for k, v in objects.items()}
    else:
        keys = {k for obj in objects for k in obj}
        columns = {k: [obj.get(k) for obj in objects] for k in keys}
    columns.setdefault("bbox", [])
    columns.setdefault("category", [])
    return columns


@dataclass
class BoxColumns:
    """A split's boxes as arrays, read from its Arrow columns: no image decoded, no row built (:func:`box_columns`).

    Attributes:
        image_ids: (m,) int64, per row (the row index when the split has no ``image_id``).
        widths, heights: (m,) float64 image size in pixels per row, or None when the split has no such column.
        counts: (m,) int64 boxes per row.
        boxes: (n, 4) float64, every row's ``objects["bbox"]`` as stored (COCO ``[x, y, w, h]`` pixels in rows of
            this package), rows one after the other.
        categories: (n,) int64 ``objects["category"]``; iscrowd: (n,) int64 (0 without the field).
    """

    image_ids: np.ndarray
    widths: np.ndarray | None
    heights: np.ndarray | None
    counts: np.ndarray
    boxes: np.ndarray
    categories: np.ndarray
    iscrowd: np.ndarray

    @property
    def owners(self) -> np.ndarray:
        """(n,) the row of each box."""
        return np.repeat(np.arange(len(self.counts)), self.counts)


def box_columns(dataset: datasets.Dataset, name: str = "dataset") -> BoxColumns:
    """The boxes of ``dataset`` (either layout of ``objects``: a dict of lists or a list of dicts) as arrays,
    from its Arrow table (fast: 10,000 rows in milliseconds). ValueError naming ``name`` and the row when a
    ``bbox`` does not have 4 numbers."""
    wanted = [c for c in ("image_id", "width", "height", "objects") if c in dataset.column_names]
    table = dataset.select_columns(wanted).with_format("arrow")[:]
    objects = table.column("objects").combine_chunks()
    if pa.types.is_struct(objects.type):  # {"bbox": [...], "category": [...]}: one list per field
        counts = objects.field("bbox").value_lengths().fill_null(0)
        field = {k: objects.field(k).flatten() for k in ("bbox", "category", "iscrowd")
                 if objects.type.get_field_index(k) >= 0}
    else:  # [{"bbox": ..., "category": ...}, ...]: one struct per object
        counts = objects.value_lengths().fill_null(0)
        flat = objects.flatten()
        field = {k: flat.field(k) for k in ("bbox", "category", "iscrowd") if flat.type.get_field_index(k) >= 0}
    counts = counts.to_numpy(zero_copy_only=False).astype(np.int64)
    rows = len(counts)

    def per_row(column: str, dtype: type) -> np.ndarray | None:
        return table.column(column).to_numpy().astype(dtype) if column in wanted else None

    image_ids = per_row("image_id", np.int64)
    return BoxColumns(image_ids if image_ids is not None else np.arange(rows), per_row("width", np.float64),
                      per_row("height", np.float64), counts, _bbox_array(field["bbox"], counts, name),
                      _numbers(field.get("category"), counts.sum()), _numbers(field.get("iscrowd"), counts.sum()))


def _bbox_array(bbox: pa.Array, counts: np.ndarray, name: str) -> np.ndarray:
    """(n, 4) float64 of an Arrow array of n boxes (fixed-size or variable lists)."""
    if not pa.types.is_fixed_size_list(bbox.type):
        lengths = bbox.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        if (lengths != 4).any():
            bad = int(np.nonzero(lengths != 4)[0][0])
            row = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
            raise ValueError(f"{name}: row {row} has a bbox of {lengths[bad]} numbers; expected 4 (x, y, w, h)")
    values = bbox.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float64).reshape(-1, 4)


def _numbers(column: pa.Array | None, n: int) -> np.ndarray:
    """(n,) int64 of an Arrow column (nulls as 0), or zeros without one."""
    return np.zeros(n, np.int64) if column is None else column.fill_null(0).to_numpy(zero_copy_only=False).astype(
        np.int64)


def metric_references(dataset: datasets.Dataset,
                      label_to_category_id: Mapping[int, int] | None = None) -> list[dict]:
    """Per-image ground truth for the COCO metric, read without decoding images.

    Returns one dict per row: ``image_id``, ``boxes`` (absolute COCO ``[x, y, w, h]`` pixels of
    the stored image), ``category_ids`` (COCO ids via ``label_to_category_id``; identity if
    None), ``area`` and ``iscrowd`` (0 when the dataset has no such field).
    """
    rows = dataset.select_columns(["image_id", "objects"])
    if label_to_category_id is None:
        label_to_category_id = _Identity()
    return [_reference(row, label_to_category_id) for row in rows]


class _Identity(dict):
    """``mapping[label] == label`` for every label: datasets without COCO ids."""

    def __missing__(self, key: int) -> int:
        return key


def _reference(row: Mapping[str, Any], label_to_category_id: Mapping[int, int]) -> dict:
    objs = objects_as_columns(row["objects"])
    boxes = [list(map(float, b)) for b in objs["bbox"]]
    area = objs.get("area") or [b[2] * b[3] for b in boxes]
    crowd = objs.get("iscrowd") or [0] * len(boxes)
    return {"image_id": int(row["image_id"]), "boxes": boxes,
            "category_ids": [int(label_to_category_id[int(c)]) for c in objs["category"]],
            "area": [float(a) for a in area], "iscrowd": [int(c) for c in crowd]}
