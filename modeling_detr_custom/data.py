"""Detection datasets for training and evaluation: local COCO folders, Hub datasets, saved datasets.

Not remote code: nothing in the model/config/processor files imports this module.

Every source ends up in the schema of the Hub's detection datasets (e.g. ``cppe-5``)::

    image_id: int64
    image:    datasets.Image()                 (decodes to PIL; stored as a path for COCO folders)
    width, height: int32                       (pixels of the stored image, before any EXIF rotation)
    objects:  {"id":       List(int64),
               "area":     List(float32),      (COCO's area: the MASK area when the file has one)
               "bbox":     List(List(float32, length=4)),   ABSOLUTE pixels, COCO [x, y, w, h]
               "category": List(ClassLabel),   the MODEL's label id (see below)
               "iscrowd":  List(int8)}         (only from COCO folders; 1 = crowd region)

Label ids: by default COCO's raw category ids are the labels, as in the original DETR
(``ClassLabel`` with ``max_id + 1`` names; ids no category uses are named ``"N/A_<id>"``
because ClassLabel names must be unique; ``id2label`` names them ``"N/A"`` like the hub's
COCO DETR configs). With ``contiguous_labels=True`` labels are ``0..K-1`` in sorted
category-id order. :class:`LabelMapping` records both directions, so ``id2label`` can go into
the model config and evaluation can map predicted labels back to COCO category ids.

Bad data is found up-front, never in the middle of an epoch: every image header is opened
(``PIL.Image.open`` + ``verify``), and :func:`load_coco_folder` returns a per-split report
of what was fixed or skipped (see :data:`REPORT_KEYS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import datasets
from datasets import ClassLabel, DatasetDict, Features, List, Value
from PIL import Image

from .checks import read_json
from .image_processing_detr_custom import HIGH_BIT_DEPTH_FULL_SCALE, pil_to_rgb8

logger = logging.getLogger(__name__)

# Bump when the rows produced for the same files change, so old caches are not reused.
_SCHEMA_VERSION = 2  # 2: 16-bit images re-encoded scaled to 8 bits, not clipped
_EXIF_ORIENTATION = 0x0112
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

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


# ----------------------------------------------------------------------------- label mapping


@dataclass
class LabelMapping:
    """Model label id <-> dataset category.

    Attributes:
        names: ClassLabel names, index = model label id (unique; gaps named ``"N/A_<id>"``).
        label_to_category_id: model label id -> original COCO category id (identity for raw ids
            and for datasets without COCO ids); covers only labels that are real categories.
    """

    names: list[str]
    label_to_category_id: dict[int, int]

    @property
    def id2label(self) -> dict[int, str]:
        """For the model config: every label id 0..len(names)-1, gaps named ``"N/A"``."""
        return {i: ("N/A" if i not in self.label_to_category_id else n) for i, n in enumerate(self.names)}

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in self.id2label.items() if i in self.label_to_category_id}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {c: label for label, c in self.label_to_category_id.items()}


def label_mapping_from_categories(categories: Sequence[Mapping[str, Any]], contiguous_labels: bool = False) -> LabelMapping:
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


def label_mapping_from_features(features: Features) -> LabelMapping:
    """Identity mapping from a dataset's ``objects.category`` ClassLabel (Hub / saved datasets)."""
    category = features["objects"]["category"]
    feature = getattr(category, "feature", category)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"objects.category must be a ClassLabel (its names become id2label), got {feature!r}; "
            "cast it with dataset.cast_column(...)"
        )
    real = {i: i for i, n in enumerate(feature.names) if not n.startswith("N/A")}
    return LabelMapping(list(feature.names), real)


# ----------------------------------------------------------------------------- COCO folder layout


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
    raise ValueError(f"no image folder for split {name!r} in {root} (tried images/{name}, {name}, images/{short}, {short}, images)")


# ----------------------------------------------------------------------------- up-front checks


@dataclass
class _ImageInfo:
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


def _check_images(images: list[dict], image_dir: Path, full_decode: bool, report: dict, raise_on_bad: bool) -> dict[int, _ImageInfo]:
    """Probe every listed image (threads: it is I/O); return the usable ones by image id."""
    paths = [_resolve_image_path(image_dir, img["file_name"]) for img in images]
    workers = min(16, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        probes = list(pool.map(lambda p: _probe_image(p, full_decode), paths))
    kept: dict[int, _ImageInfo] = {}
    for img, path, (status, w, h, rotated, high_bit_depth) in zip(images, paths, probes):
        if status == "ok" and (img.get("width", w), img.get("height", h)) != (w, h):
            status = "size_mismatch"
        if status != "ok":
            report[f"{status}_images"] += 1
            _bad(raise_on_bad, f"image {img['id']} ({path}): {status.replace('_', ' ')}")
            continue
        report["exif_rotated_images"] += int(rotated)
        report["high_bit_depth_images"] += int(high_bit_depth)
        kept[int(img["id"])] = _ImageInfo(path, w, h, rotated)
    return kept


def _bad(raise_on_bad: bool, message: str) -> None:
    """Raise for bad data in "raise" mode; in "skip" mode the report counts it instead."""
    if raise_on_bad:
        raise ValueError(f"bad COCO data: {message} (use on_bad_data='skip' to skip and count such items)")
    logger.debug("skipping bad COCO data: %s", message)


def _clean_box(bbox: Any, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """Clip a COCO ``[x, y, w, h]`` box to the image; return (box or None, what happened)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, "invalid_bbox_dropped"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, "invalid_bbox_dropped"
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None, "zero_area_boxes_dropped"
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return [x0, y0, x1 - x0, y1 - y0], ("boxes_clipped" if clipped else None)


def _clean_annotations(
    annotations: list[dict], images: dict[int, _ImageInfo], listed_ids: set[int],
    cat_to_label: dict[int, int], report: dict, raise_on_bad: bool,
) -> dict[int, list[dict]]:
    """Group usable annotations by image id; clip, drop and count the rest (see REPORT_KEYS)."""
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for ann in annotations:
        try:
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"annotation {ann!r:.200} needs integer 'image_id' and 'category_id'") from err
        if image_id not in images:
            report["orphan_annotations_dropped"] += 1
            _bad(raise_on_bad and image_id not in listed_ids, f"annotation {ann.get('id')}: unknown image_id {image_id}")
            continue
        if cat not in cat_to_label:
            report["unknown_category_dropped"] += 1
            _bad(raise_on_bad, f"annotation {ann.get('id')}: category_id {cat} not in 'categories'")
            continue
        info = images[image_id]
        box, event = _clean_box(ann.get("bbox"), info.width, info.height)
        if event:
            report[event] += 1
        if box is not None:
            by_image[image_id].append(_object_row(ann, box, cat_to_label[cat]))
    return by_image


def _object_row(ann: dict, box: list[float], label: int) -> dict:
    iscrowd = int(ann.get("iscrowd", 0))
    area = float(ann["area"]) if ann.get("area") is not None else box[2] * box[3]
    return {"id": int(ann.get("id", -1)), "area": area, "bbox": box, "category": label, "iscrowd": iscrowd}


# ----------------------------------------------------------------------------- dataset building


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


def _build_rows(by_image: dict[int, list[dict]], images: dict[int, _ImageInfo]) -> tuple:
    rows = []
    for image_id in sorted(by_image):
        info, objs = images[image_id], by_image[image_id]
        objects = {k: [o[k] for o in objs] for k in ("id", "area", "bbox", "category", "iscrowd")}
        image = {"path": str(info.path.resolve()), "exif_rotated": info.exif_rotated}
        rows.append({"image_id": image_id, "image": image, "width": info.width, "height": info.height, "objects": objects})
    return tuple(rows)


def _directory_listing_hash(image_dir: Path) -> str:
    """Hash of (name, size, mtime) of every image file: changes when any image changes."""
    h = hashlib.sha256()
    with os.scandir(image_dir) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.lower().endswith(_IMAGE_EXTENSIONS) and e.is_file():
                st = e.stat()
                h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fingerprint(split: CocoSplit, ann_bytes: bytes, options: dict) -> str:
    """Cache key: annotation bytes + image listing + options + schema version."""
    h = hashlib.sha256(ann_bytes)
    h.update(_directory_listing_hash(split.image_dir).encode())
    h.update(json.dumps({"v": _SCHEMA_VERSION, "dir": str(split.image_dir.resolve()), **options}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _empty_report() -> dict[str, int]:
    return {k: 0 for k in REPORT_KEYS}


def _load_coco_split(
    split: CocoSplit, contiguous_labels: bool, on_bad_data: str, full_decode_check: bool, cache_dir: str | None,
) -> tuple[datasets.Dataset, LabelMapping, dict[str, int]]:
    """Check, clean and build one split (cached by :func:`_fingerprint`)."""
    ann_bytes = split.annotation_file.read_bytes()
    coco = read_json(split.annotation_file, ann_bytes)
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{split.annotation_file} is not a COCO detection file: no {key!r} key")
    mapping = label_mapping_from_categories(coco["categories"], contiguous_labels)
    raise_on_bad = on_bad_data == "raise"
    report = _empty_report()
    report["images"], report["annotations"] = len(coco["images"]), len(coco["annotations"])
    images = _check_images(coco["images"], split.image_dir, full_decode_check, report, raise_on_bad)
    listed = {int(i["id"]) for i in coco["images"]}
    if len(listed) != len(coco["images"]):
        raise ValueError(f"{split.annotation_file}: duplicate image ids in 'images'")
    by_image = _clean_annotations(coco["annotations"], images, listed, mapping.category_id_to_label, report, raise_on_bad)
    _finish_report(report, by_image)
    if not by_image:
        raise ValueError(f"split {split.name!r} of {split.annotation_file.parent.parent}: no usable image; report: {report}")
    options = {"contiguous": contiguous_labels, "full_decode": full_decode_check, "split": split.name}
    ds = datasets.Dataset.from_generator(
        _generate_rows, features=detection_features(mapping.names), cache_dir=cache_dir,
        gen_kwargs={"rows": _build_rows(by_image, images)}, split=datasets.NamedSplit(split.name),
        fingerprint=_fingerprint(split, ann_bytes, options),
    )
    return ds, mapping, report


def _finish_report(report: dict[str, int], by_image: dict[int, list[dict]]) -> None:
    report["images_kept"] = len(by_image)
    report["images_without_annotations"] = sum(1 for objs in by_image.values() if not objs)
    report["annotations_kept"] = sum(len(objs) for objs in by_image.values())
    report["crowd_annotations"] = sum(o["iscrowd"] for objs in by_image.values() for o in objs)


def _log_report(name: str, report: dict[str, int]) -> None:
    skipped = {k: v for k, v in report.items() if v and k not in ("images", "images_kept", "annotations", "annotations_kept")}
    level = logging.WARNING if any(k.endswith(("_dropped", "missing_images", "corrupt_images", "size_mismatch_images")) for k in skipped) else logging.INFO
    logger.log(level, "split %s: kept %d/%d images, %d/%d annotations; %s", name, report["images_kept"], report["images"],
               report["annotations_kept"], report["annotations"], skipped or "no bad data")


@dataclass
class DetectionData:
    """What the training script needs from any source.

    Attributes:
        dataset: splits in the schema of this module's docstring.
        label_mapping: ``id2label`` for the model config and label -> COCO category id.
        report: per split, counts of fixed/skipped items (COCO folders only; see REPORT_KEYS).
        annotation_files: per split, the COCO json (COCO folders only): give it to the COCO
            metric for evaluation exactly against the original ground truth (crowd regions included).
    """

    dataset: DatasetDict
    label_mapping: LabelMapping
    report: dict[str, dict[str, int]] = field(default_factory=dict)
    annotation_files: dict[str, Path] = field(default_factory=dict)


def load_coco_folder_with_info(
    coco_dir: str | Path,
    contiguous_labels: bool = False,
    splits: Sequence[str] | None = None,
    on_bad_data: Literal["skip", "raise"] = "skip",
    full_decode_check: bool = False,
    cache_dir: str | None = None,
) -> DetectionData:
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
        out[name], mapping, reports[name] = _load_coco_split(found[name], contiguous_labels, on_bad_data, full_decode_check, cache_dir)
        mappings.append(mapping)
        _log_report(name, reports[name])
    if any(m != mappings[0] for m in mappings):
        raise ValueError(f"splits of {coco_dir} have different 'categories'; labels would not agree across splits")
    files = {n: found[n].annotation_file for n in names}
    return DetectionData(DatasetDict(out), mappings[0], reports, files)


def load_coco_folder(
    coco_dir: str | Path,
    contiguous_labels: bool = False,
    splits: Sequence[str] | None = None,
    on_bad_data: Literal["skip", "raise"] = "skip",
    full_decode_check: bool = False,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load a local COCO folder as a :class:`datasets.DatasetDict` (schema: module docstring).

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

    Use :func:`load_coco_folder_with_info` to also get the label mapping and the report.
    """
    return load_coco_folder_with_info(coco_dir, contiguous_labels, splits, on_bad_data, full_decode_check, cache_dir).dataset


# ----------------------------------------------------------------------------- any source


def validate_detection_schema(dataset: datasets.Dataset, name: str = "dataset") -> None:
    """Raise ValueError naming the first missing column of the detection schema."""
    cols = dataset.features
    for col in ("image", "objects"):
        if col not in cols:
            raise ValueError(f"{name} has no {col!r} column (columns: {list(cols)}); expected the schema of modeling_detr_custom.data")
    if not isinstance(cols["image"], datasets.Image):
        raise ValueError(f"{name}: column 'image' must be a datasets.Image feature, got {cols['image']!r}")
    objects = cols["objects"]
    sub = objects.feature if hasattr(objects, "feature") else objects  # List({...}) or {...: List}
    for key in ("bbox", "category"):
        if key not in sub:
            raise ValueError(f"{name}: column 'objects' has no {key!r} field (fields: {list(sub)}); "
                             "bbox must be absolute COCO [x, y, w, h] pixels")


def _ensure_image_id(ds: datasets.Dataset) -> datasets.Dataset:
    """Hub datasets without ``image_id`` get the row index (needed to match predictions to GT)."""
    return ds if "image_id" in ds.column_names else ds.add_column("image_id", list(range(len(ds))))


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
    this module (``objects.bbox`` absolute COCO xywh pixels, ``objects.category`` a ClassLabel);
    their labels map to themselves (``label_to_category_id`` is the identity).
    ``load_dataset_kwargs`` go to :func:`datasets.load_dataset` (e.g. ``revision``).
    """
    given = [s for s in (dataset_name, coco_dir, dataset_path) if s is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of dataset_name, coco_dir, dataset_path")
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


def find_split(dataset: DatasetDict, kind: Literal["train", "eval"]) -> str:
    """Name of the training split (``train``) or evaluation split (``validation``/``val``/``test``)."""
    candidates = ("train",) if kind == "train" else ("validation", "val", "valid", "test")
    for name in candidates:
        if name in dataset:
            return name
    raise ValueError(f"no {kind} split among {list(dataset)}; expected one of {candidates}")


def objects_as_columns(objects: Mapping[str, Sequence] | Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """A row's ``objects`` as a dict of lists, whether the dataset stores a dict of lists
    (this module, cppe-5) or a list of dicts (``List({...})`` features). Always has bbox and category."""
    if isinstance(objects, Mapping):
        columns = {k: list(v) for k, v in objects.items()}
    else:
        keys = {k for obj in objects for k in obj}
        columns = {k: [obj.get(k) for obj in objects] for k in keys}
    columns.setdefault("bbox", [])
    columns.setdefault("category", [])
    return columns


def metric_references(dataset: datasets.Dataset, label_to_category_id: Mapping[int, int] | None = None) -> list[dict]:
    """Per-image ground truth for the COCO metric, read without decoding images.

    Returns one dict per row: ``image_id``, ``boxes`` (absolute COCO ``[x, y, w, h]`` pixels of
    the stored image), ``category_ids`` (COCO ids via ``label_to_category_id``; identity if
    None), ``area`` and ``iscrowd`` (0 when the dataset has no such field).
    """
    rows = dataset.select_columns(["image_id", "objects"])
    to_cat = (lambda label: int(label)) if label_to_category_id is None else (lambda label: int(label_to_category_id[int(label)]))
    refs = []
    for row in rows:
        objs = objects_as_columns(row["objects"])
        boxes = [list(map(float, b)) for b in objs["bbox"]]
        area = objs.get("area") or [b[2] * b[3] for b in boxes]
        refs.append({"image_id": int(row["image_id"]), "boxes": boxes,
                     "category_ids": [to_cat(c) for c in objs["category"]],
                     "area": [float(a) for a in area], "iscrowd": [int(c) for c in objs.get("iscrowd") or [0] * len(boxes)]})
    return refs
