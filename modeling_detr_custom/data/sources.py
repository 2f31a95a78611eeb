"""Any detection data source as :class:`.schema.DetectionData`: a Hub dataset, a COCO folder, a saved dataset.

Boxes are read in the declared ``box_format`` (:mod:`.box_format`; COCO xywh pixels by default) and stored as COCO
xywh pixels; numbers that look like another format than the declared one are a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from datasets import DatasetDict

from .box_format import check_box_format, check_format_name, to_xywh
from .coco import load_coco_folder_with_info
from .schema import DetectionData, box_columns, label_mapping_from_features, validate_detection_schema


def load_detection_dataset(
    dataset_name: str | None = None,
    coco_dir: str | Path | None = None,
    dataset_path: str | Path | None = None,
    *,
    contiguous_labels: bool = False,
    on_bad_data: Literal["skip", "raise"] = "skip",
    cache_dir: str | None = None,
    box_format: str = "xywh",
    **load_dataset_kwargs: Any,
) -> DetectionData:
    """One entry point: a Hub dataset name, a local COCO folder, or a ``save_to_disk`` folder.

    Exactly one source must be given. Hub and saved datasets must already have the schema of
    :mod:`.schema` (``objects.category`` a ClassLabel, ``objects.bbox`` absolute COCO xywh pixels unless
    ``box_format`` declares another format, then converted to it); their labels map to themselves
    (``label_to_category_id`` is the identity). ``load_dataset_kwargs`` go to :func:`datasets.load_dataset`
    (e.g. ``revision``).
    """
    given = [s for s in (dataset_name, coco_dir, dataset_path) if s is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of dataset_name, coco_dir, dataset_path; got {given}")
    check_format_name(box_format)
    if coco_dir is not None:
        return load_coco_folder_with_info(coco_dir, contiguous_labels, on_bad_data=on_bad_data, cache_dir=cache_dir,
                                          box_format=box_format)
    if dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, cache_dir=cache_dir, **load_dataset_kwargs)
    else:
        loaded = datasets.load_from_disk(str(dataset_path))
    if isinstance(loaded, datasets.Dataset):
        loaded = DatasetDict({"train": loaded})
    for split, ds in loaded.items():
        validate_detection_schema(ds, f"{given[0]} split {split!r}")
    dd = DatasetDict({k: as_coco_boxes(_ensure_image_id(v), box_format, f"{given[0]} split {k!r}")
                      for k, v in loaded.items()})
    return DetectionData(dd, label_mapping_from_features(next(iter(dd.values())).features))


def as_coco_boxes(ds: datasets.Dataset, box_format: str, where: str) -> datasets.Dataset:
    """``ds`` with its boxes, given in ``box_format``, as COCO xywh pixels; ValueError naming ``where`` when the
    numbers look like another format (:func:`.box_format.check_box_format`, on the numbers as given)."""
    columns = box_columns(ds, where)
    owners = columns.owners
    width = None if columns.widths is None else torch.from_numpy(columns.widths[owners])
    height = None if columns.heights is None else torch.from_numpy(columns.heights[owners])
    check_box_format(torch.from_numpy(columns.boxes), width, height, box_format, where)
    if box_format == "xywh":
        return ds
    if box_format.endswith("_normalized") and width is None:
        raise ValueError(f"{where}: --box_format {box_format} needs each image's size, but the split has no "
                         "'width' and 'height' columns")
    sizes = ["width", "height"] if width is not None else []
    return ds.map(_converted_objects, batched=True, input_columns=["objects", *sizes],
                  fn_kwargs={"box_format": box_format}, desc=f"boxes {box_format} -> xywh")


def _converted_objects(objects: list, width: list | None = None, height: list | None = None, *,
                       box_format: str) -> dict[str, list]:
    """A batch's ``objects`` with every bbox converted from ``box_format`` to COCO xywh pixels (either layout)."""
    converted = []
    for i, row in enumerate(objects):
        bboxes = row["bbox"] if isinstance(row, Mapping) else [obj["bbox"] for obj in row]
        size = (None, None) if width is None else (float(width[i]), float(height[i]))
        boxes = to_xywh(torch.tensor(bboxes, dtype=torch.float64).reshape(-1, 4), box_format, *size).tolist()
        converted.append({**row, "bbox": boxes} if isinstance(row, Mapping) else
                         [{**obj, "bbox": box} for obj, box in zip(row, boxes)])
    return {"objects": converted}


def _ensure_image_id(ds: datasets.Dataset) -> datasets.Dataset:
    """Hub datasets without ``image_id`` get the row index (needed to match predictions to GT)."""
    return ds if "image_id" in ds.column_names else ds.add_column("image_id", list(range(len(ds))))


def find_split(dataset: DatasetDict, kind: Literal["train", "eval"]) -> str:
    """Name of the training split (``train``) or evaluation split (``validation``/``val``/``test``)."""
    candidates = ("train",) if kind == "train" else ("validation", "val", "valid", "test")
    for name in candidates:
        if name in dataset:
            return name
    raise ValueError(f"no {kind} split among {list(dataset)}; expected one of {candidates}")
