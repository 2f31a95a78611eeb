"""Any detection data source as :class:`.schema.DetectionData`: a Hub dataset, a COCO folder, a saved dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import DatasetDict

from .coco import load_coco_folder_with_info
from .schema import DetectionData, label_mapping_from_features, validate_detection_schema


def load_detection_dataset(
    dataset_name: str | None = None,
    coco_dir: str | Path | None = None,
    dataset_path: str | Path | None = None,
    *,
    contiguous_labels: bool = False,
    on_bad_data: Literal["skip", "raise"] = "skip",
    cache_dir: str | None = None,
    **load_dataset_kwargs: Any,
) -> DetectionData:
    """One entry point: a Hub dataset name, a local COCO folder, or a ``save_to_disk`` folder.

    Exactly one source must be given. Hub and saved datasets must already have the schema of
    :mod:`.schema` (``objects.bbox`` absolute COCO xywh pixels, ``objects.category`` a ClassLabel);
    their labels map to themselves (``label_to_category_id`` is the identity).
    ``load_dataset_kwargs`` go to :func:`datasets.load_dataset` (e.g. ``revision``).
    """
    given = [s for s in (dataset_name, coco_dir, dataset_path) if s is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of dataset_name, coco_dir, dataset_path; got {given}")
    if coco_dir is not None:
        return load_coco_folder_with_info(coco_dir, contiguous_labels, on_bad_data=on_bad_data, cache_dir=cache_dir)
    if dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, cache_dir=cache_dir, **load_dataset_kwargs)
    else:
        loaded = datasets.load_from_disk(str(dataset_path))
    if isinstance(loaded, datasets.Dataset):
        loaded = DatasetDict({"train": loaded})
    for split, ds in loaded.items():
        validate_detection_schema(ds, f"{given[0]} split {split!r}")
    dd = DatasetDict({k: _ensure_image_id(v) for k, v in loaded.items()})
    return DetectionData(dd, label_mapping_from_features(next(iter(dd.values())).features))


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
