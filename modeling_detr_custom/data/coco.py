"""Local COCO folders as detection datasets (schema: :mod:`.schema`), checked up-front and cached.

:func:`load_coco_folder` finds the splits of a folder, checks every image and annotation (:mod:`.coco_checks`:
what was fixed or skipped comes back as a per-split report) and builds a :class:`datasets.Dataset` per split,
cached under a key that changes whenever the annotation file, the image folder listing or the options change.
Images stay files on disk (the rows store their paths), except EXIF-rotated ones, stored re-encoded without
the rotation because COCO boxes are in the raw pixel grid.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
from datasets import DatasetDict
from PIL import Image

from ..checks import read_json
from ..image_processing_detr_custom import pil_to_rgb8
from .coco_checks import ImageInfo, check_images, clean_annotations, empty_report, finish_report, log_report
from .schema import DetectionData, LabelMapping, detection_features, label_mapping_from_categories

# Bump when the rows produced for the same files change, so old caches are not reused.
_SCHEMA_VERSION = 2  # 2: 16-bit images re-encoded scaled to 8 bits, not clipped
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- folder layout


@dataclass
class CocoSplit:
    """One split of a COCO folder: its annotation json and its image folder."""

    name: str
    annotation_file: Path
    image_dir: Path


def find_coco_splits(coco_dir: str | Path) -> dict[str, CocoSplit]:
    """Find ``annotations/instances_<name>.json`` files and their image folders.

    Split names drop a trailing year (``train2017`` -> ``train``) unless that would clash.
    Image folders tried, in order: ``images/<name>``, ``<name>``, ``images/<short>``,
    ``<short>``, ``images``.
    """
    root = Path(coco_dir)
    files = sorted((root / "annotations").glob("instances_*.json"))
    if not files:
        raise ValueError(f"no annotations/instances_<split>.json in COCO folder {root}")
    names = [f.stem[len("instances_"):] for f in files]
    shorts = [re.sub(r"\d{4}$", "", n) or n for n in names]
    splits = {}
    for f, name, short in zip(files, names, shorts):
        key = short if shorts.count(short) == 1 else name
        splits[key] = CocoSplit(key, f, _find_image_dir(root, name, short))
    return splits


def _find_image_dir(root: Path, name: str, short: str) -> Path:
    for cand in (root / "images" / name, root / name, root / "images" / short, root / short, root / "images"):
        if cand.is_dir():
            return cand
    raise ValueError(f"no image folder for split {name!r} in {root} "
                     f"(tried images/{name}, {name}, images/{short}, {short}, images)")


# ----------------------------------------------------------------------------- rows and cache key


def _generate_rows(rows: tuple) -> Iterator[dict]:
    """Generator for ``Dataset.from_generator``; ``rows`` is a tuple (a list would be sharded)."""
    for row in rows:
        image = row["image"]
        if image.get("exif_rotated"):
            image = {"path": None, "bytes": _raw_png_bytes(Path(image["path"]))}
        else:
            image = {"path": image["path"], "bytes": None}
        yield {**row, "image": image}


def _raw_png_bytes(path: Path) -> bytes:
    """The stored pixels as PNG, without the EXIF rotation ``datasets.Image`` would apply.

    COCO boxes (and pycocotools, torchvision, the original DETR) use the raw pixel grid.
    """
    with Image.open(path) as im:
        buf = io.BytesIO()
        pil_to_rgb8(im, str(path)).save(buf, format="PNG")
    return buf.getvalue()


def _build_rows(by_image: dict[int, list[dict]], images: dict[int, ImageInfo]) -> tuple:
    rows = []
    for image_id in sorted(by_image):
        info, objs = images[image_id], by_image[image_id]
        objects = {k: [o[k] for o in objs] for k in ("id", "area", "bbox", "category", "iscrowd")}
        image = {"path": str(info.path.resolve()), "exif_rotated": info.exif_rotated}
        rows.append({"image_id": image_id, "image": image, "width": info.width, "height": info.height,
                     "objects": objects})
    return tuple(rows)


def _directory_listing_hash(image_dir: Path) -> str:
    """Hash of (name, size, mtime) of every image file: changes when any image changes."""
    h = hashlib.sha256()
    with os.scandir(image_dir) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                st = e.stat()
                h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(image_dir: Path, content: bytes, options: dict) -> str:
    """Cache key: ``content`` (the annotation bytes) + image listing + options + schema version."""
    h = hashlib.sha256(content)
    h.update(_directory_listing_hash(image_dir).encode())
    settings = {"v": _SCHEMA_VERSION, "dir": str(image_dir.resolve()), **options}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def build_split_dataset(name: str, by_image: dict[int, list[dict]], images: dict[int, ImageInfo],
                        class_names: Sequence[str], key: str, cache_dir: str | None) -> datasets.Dataset:
    """The rows of checked objects (by image id) and images as one split, cached under ``key``."""
    return datasets.Dataset.from_generator(
        _generate_rows, features=detection_features(class_names), cache_dir=cache_dir,
        gen_kwargs={"rows": _build_rows(by_image, images)}, split=datasets.NamedSplit(name), fingerprint=key,
    )


# ----------------------------------------------------------------------------- loading


def _read_coco_file(split: CocoSplit) -> tuple[bytes, dict]:
    """(raw bytes, parsed json) of the split's annotation file; ValueError if it is no COCO detection file."""
    ann_bytes = split.annotation_file.read_bytes()
    coco = read_json(split.annotation_file, ann_bytes)
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{split.annotation_file} is not a COCO detection file: no {key!r} key")
    return ann_bytes, coco


def _listed_image_ids(split: CocoSplit, images: list[dict]) -> set[int]:
    listed = {int(i["id"]) for i in images}
    if len(listed) != len(images):
        raise ValueError(f"{split.annotation_file}: duplicate image ids in 'images'")
    return listed


def _load_coco_split(
    split: CocoSplit, contiguous_labels: bool, on_bad_data: str, full_decode_check: bool, cache_dir: str | None,
    box_format: str = "xywh",
) -> tuple[datasets.Dataset, LabelMapping, dict[str, int]]:
    """Check, clean and build one split (cached by :func:`fingerprint`)."""
    ann_bytes, coco = _read_coco_file(split)
    mapping = label_mapping_from_categories(coco["categories"], contiguous_labels)
    raise_on_bad = on_bad_data == "raise"
    report = empty_report()
    report["images"], report["annotations"] = len(coco["images"]), len(coco["annotations"])
    images = check_images(coco["images"], split.image_dir, full_decode_check, report, raise_on_bad)
    listed = _listed_image_ids(split, coco["images"])
    by_image = clean_annotations(coco["annotations"], images, listed, mapping.category_id_to_label, report,
                                 raise_on_bad, box_format, where=str(split.annotation_file))
    finish_report(report, by_image)
    if not by_image:
        raise ValueError(f"split {split.name!r} of {split.annotation_file.parent.parent}: no usable image; "
                         f"report: {report}")
    options = {"contiguous": contiguous_labels, "full_decode": full_decode_check, "split": split.name}
    if box_format != "xywh":  # only then: the cache keys of xywh files stay those of before the option
        options["box_format"] = box_format
    key = fingerprint(split.image_dir, ann_bytes, options)
    ds = build_split_dataset(split.name, by_image, images, mapping.names, key, cache_dir)
    return ds, mapping, report


def load_coco_folder_with_info(coco_dir: str | Path, contiguous_labels: bool = False,
                               splits: Sequence[str] | None = None, on_bad_data: Literal["skip", "raise"] = "skip",
                               full_decode_check: bool = False, cache_dir: str | None = None,
                               box_format: str = "xywh") -> DetectionData:
    """Like :func:`load_coco_folder`, also returning the label mapping, report and json paths."""
    if on_bad_data not in ("skip", "raise"):
        raise ValueError(f"on_bad_data must be 'skip' or 'raise', got {on_bad_data!r}")
    found = find_coco_splits(coco_dir)
    names = list(splits) if splits is not None else list(found)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"splits {missing} not in COCO folder {coco_dir}; found {list(found)}")
    out, reports, mappings = {}, {}, []
    for name in names:
        out[name], mapping, reports[name] = _load_coco_split(found[name], contiguous_labels, on_bad_data,
                                                             full_decode_check, cache_dir, box_format)
        mappings.append(mapping)
        log_report(name, reports[name])
    if any(m != mappings[0] for m in mappings):
        raise ValueError(f"splits of {coco_dir} have different 'categories'; labels would not agree across splits")
    files = {n: found[n].annotation_file for n in names}
    return DetectionData(DatasetDict(out), mappings[0], reports, files)


def load_coco_folder(coco_dir: str | Path, contiguous_labels: bool = False, splits: Sequence[str] | None = None,
                     on_bad_data: Literal["skip", "raise"] = "skip", full_decode_check: bool = False,
                     cache_dir: str | None = None, box_format: str = "xywh") -> DatasetDict:
    """Load a local COCO folder as a :class:`datasets.DatasetDict` (schema: :mod:`.schema`).

    Args:
        coco_dir: folder with ``annotations/instances_<split>.json`` and the image folders
            (``images/<split>/``, ``<split>/``, or COCO's ``train2017/`` with
            ``instances_train2017.json``, which becomes split ``"train"``).
        contiguous_labels: labels 0..K-1 in sorted category-id order instead of raw COCO ids.
        splits: which splits to load (default: all found).
        on_bad_data: ``"skip"`` skips and counts missing/corrupt images, unknown categories and
            orphan annotations; ``"raise"`` raises ValueError on the first one. Boxes partly
            outside the image are always clipped and zero-area boxes always dropped (counted).
        full_decode_check: fully decode every image up-front (slow) to also catch truncated files.
        cache_dir: datasets cache folder; the cache key includes a hash of the annotation file
            and of the image folder listing, so editing either rebuilds the dataset.
        box_format: the format of the json's ``bbox`` (:mod:`.box_format`): COCO's ``xywh`` by definition, but
            files with ``xyxy`` or normalised boxes exist; rows always hold COCO xywh pixels. Numbers that look
            like another format than this one are a ValueError naming the likely format.

    Use :func:`load_coco_folder_with_info` to also get the label mapping and the report.
    """
    data = load_coco_folder_with_info(coco_dir, contiguous_labels, splits, on_bad_data, full_decode_check, cache_dir,
                                      box_format)
    return data.dataset
