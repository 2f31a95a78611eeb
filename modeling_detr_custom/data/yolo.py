"""Ultralytics YOLO folders as detection datasets (schema: :mod:`.schema`), checked up-front and cached.

The layout (what ultralytics trains on)::

    yolo_dir/
      data.yaml               names: [circle, square] (or {0: circle, 1: square}); train: images/train; val: ...
      images/train/a.jpg ...  one folder per split (train, val, optional test)
      labels/train/a.txt ...  one "class cx cy w h" line per box, normalised to [0, 1] by the image size

Split paths are relative to the yaml's ``path:`` key when it has one (itself relative to the yaml's folder),
else to the yaml's folder; a ``../x`` path that does not exist is also tried as ``x`` (Roboflow exports), as
ultralytics does. Labels are found by ultralytics' rule: the last ``images`` folder of the image path becomes
``labels`` (without one, the ``.txt`` files sit beside the images). Images are the files of the split folder
itself (not its subfolders), sorted by name; ``image_id`` is the position in that order, from 1.

Rows are those :func:`.coco.load_coco_folder` gives for the same images and boxes with ``contiguous_labels=True``:
absolute COCO ``[x, y, w, h]`` pixels, ``category`` = the YOLO class index (names from the yaml, identity
``label_to_category_id``), ``area`` = ``w * h`` (YOLO has no masks), ``iscrowd`` 0, ``id`` numbering the box
lines of the split that pass the checks below, from 1 (as the synthetic COCO files number their annotations).
The images go through the COCO checks (:mod:`.coco_checks`: missing, corrupt, 16-bit, EXIF), with one
difference: YOLO labels are normalised in the EXIF-ROTATED frame (ultralytics reads images with the rotation
applied), so rotated images keep their file and the rotation ``datasets.Image`` applies when decoding, and
``width``/``height`` are the rotated size. There is no listed size, hence no size mismatch.

Label lines are checked one by one; what is dropped is counted in the report (:data:`YOLO_REPORT_KEYS`), or with
``on_bad_data="raise"`` raises ValueError naming the file, the line number and the line:

* not 5 numbers (4 numbers, text, a segmentation polygon, nan) or a class that is not a whole number:
  ``malformed_label_lines_dropped``;
* a class outside ``0..K-1`` of the yaml's names: ``class_out_of_range_dropped``;
* ``cx``, ``cy``, ``w`` or ``h`` outside [0, 1] by more than 1e-6 (typically pixel coordinates):
  ``box_out_of_range_dropped``. Values in range whose box still sticks out of the image (a box centred near an
  edge) are clipped to it by the one rule of :mod:`.boxes` and counted as ``boxes_clipped``, as for COCO boxes;
  corners within 1e-6 of an edge (rounding of the 6-decimal text) are snapped to it and not counted.

An image without a label file is a negative image (``images_without_label_file``, and
``images_without_annotations``); a label file without an image is a ``missing_images`` entry (its lines are
``orphan_annotations_dropped``), except LabelImg's ``classes.txt``. Blank lines are ignored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import yaml
from datasets import DatasetDict
from PIL import ExifTags, Image

from .coco import IMAGE_EXTENSIONS, build_split_dataset, fingerprint
from .coco_checks import REPORT_KEYS, ImageInfo, check_images, clean_annotations, finish_report, log_report
from .schema import DetectionData, LabelMapping, label_mapping_from_categories

logger = logging.getLogger(__name__)

YOLO_REPORT_KEYS: tuple[str, ...] = REPORT_KEYS + (
    "images_without_label_file",  # kept as negatives (also in images_without_annotations)
    "malformed_label_lines_dropped",  # not "class cx cy w h" with 5 numbers and a whole class
    "class_out_of_range_dropped",  # class not in 0..K-1 of data.yaml's names
    "box_out_of_range_dropped",  # cx, cy, w or h outside [0, 1] by more than _TOLERANCE
)
SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")
_TOLERANCE = 1e-6  # normalised units: what 6-decimal text may round past an edge
_NOT_LABELS = ("classes.txt",)  # LabelImg writes the class list beside the labels
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_LINE_PROBLEMS = {
    "malformed_label_lines_dropped": "expected 'class cx cy w h': a whole class and 4 finite numbers",
    "class_out_of_range_dropped": "class not in 0..{last} (the {count} names of data.yaml)",
    "box_out_of_range_dropped": "cx, cy, w, h must be normalised to [0, 1]",
}


# ----------------------------------------------------------------------------- data.yaml


@dataclass
class YoloSplit:
    """One split of a YOLO folder: its image folder and its label folder."""

    name: str
    image_dir: Path
    label_dir: Path


def _yaml_path(yolo_dir: Path) -> Path:
    """``yolo_dir`` itself when it is a yaml file, else its ``data.yaml`` (or ``data.yml``)."""
    if yolo_dir.is_file():
        return yolo_dir
    for name in ("data.yaml", "data.yml"):
        if (yolo_dir / name).is_file():
            return yolo_dir / name
    raise ValueError(f"no data.yaml in YOLO folder {yolo_dir}; expected names: and train:/val: image folders")


def read_data_yaml(yolo_dir: str | Path) -> tuple[bytes, list[str], dict[str, YoloSplit]]:
    """(raw bytes, class names, splits) of a YOLO folder's ``data.yaml`` (or of that yaml file itself)."""
    path = _yaml_path(Path(yolo_dir))
    raw = path.read_bytes()
    try:
        config = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping with names: and train:/val:, got {config!r:.200}")
    root = path.parent.resolve() / str(config.get("path") or ".")
    splits = {k: _split(root, k, config[k], path) for k in SPLIT_KEYS if config.get(k) is not None}
    if not splits:
        raise ValueError(f"{path}: no split; expected train: and val: image folders (optional test:)")
    return raw, _class_names(config, path), splits


def _class_names(config: dict, path: Path) -> list[str]:
    """``names`` as a list indexed by class: a list, or a dict whose keys are exactly 0..K-1."""
    names = config.get("names")
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: names keys must be class ids 0..K-1, got {list(names)}") from err
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"{path}: names ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        names = [by_id[i] for i in range(len(by_id))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: names must be a non-empty list or {{id: name}} dict, got {names!r:.200}")
    if config.get("nc") is not None and int(config["nc"]) != len(names):
        raise ValueError(f"{path}: nc is {config['nc']} but names has {len(names)} entries")
    return [str(n) for n in names]


def _split(root: Path, key: str, value: Any, path: Path) -> YoloSplit:
    """The split's image folder (see the module docstring for how it is resolved) and its label folder."""
    if not isinstance(value, str):
        raise ValueError(f"{path}: {key} must be one image folder (a string), got {value!r:.200}")
    image_dir = root / value
    if not image_dir.is_dir() and value.startswith("../") and (root / value[3:]).is_dir():
        image_dir = root / value[3:]
    if not image_dir.is_dir():
        raise ValueError(f"{path}: {key}: {value!r} -> {image_dir} is not a folder; expected an image folder "
                         f"such as images/{key} (image-list .txt files are not supported)")
    return YoloSplit(key, image_dir, label_dir_for(image_dir))


def label_dir_for(image_dir: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels`` (else: the same folder)."""
    parts = image_dir.parts
    if "images" not in parts:
        return image_dir
    last = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:last], "labels", *parts[last + 1:])


# ----------------------------------------------------------------------------- files of a split


def _image_entries(split: YoloSplit, labels: dict[str, bytes]) -> list[dict]:
    """COCO-style ``images`` entries (``id``, ``file_name``, ``stem``): the image files sorted by name, then one
    entry per label file without an image (``<stem>.*``: never a file, so :func:`check_images` finds it missing)."""
    names = sorted(e.name for e in os.scandir(split.image_dir)
                   if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    stems = [Path(n).stem for n in names]
    entries = [{"id": i, "file_name": n, "stem": s} for i, (n, s) in enumerate(zip(names, stems), start=1)]
    orphans = sorted(set(labels) - set(stems))
    entries += [{"id": len(names) + i, "file_name": f"{s}.*", "stem": s} for i, s in enumerate(orphans, start=1)]
    return entries


def _read_labels(split: YoloSplit) -> dict[str, bytes]:
    """Label file bytes by stem; none (with a warning) when the label folder does not exist."""
    if not split.label_dir.is_dir():
        logger.warning("split %s: no label folder %s; every image is a negative", split.name, split.label_dir)
        return {}
    files = sorted(p for p in split.label_dir.glob("*.txt") if p.name not in _NOT_LABELS and p.is_file())
    return {p.stem: p.read_bytes() for p in files}


def _labels_digest(labels: dict[str, bytes]) -> bytes:
    """Hash of every label file's name and contents (part of the cache key)."""
    h = hashlib.sha256()
    for stem, data in labels.items():
        h.update(f"{stem}\0{len(data)}\0".encode() + data)
    return h.hexdigest().encode()


def _displayed(info: ImageInfo) -> ImageInfo:
    """The image as ultralytics sees it: EXIF rotation applied (by ``datasets.Image`` when decoding), so the size
    labels are normalised by is the rotated one."""
    if not info.exif_rotated:
        return info
    with Image.open(info.path) as im:
        transposed = im.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS
    width, height = (info.height, info.width) if transposed else (info.width, info.height)
    return ImageInfo(info.path, width, height, exif_rotated=False)


# ----------------------------------------------------------------------------- label lines


def _lines(data: bytes) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines."""
    text = data.decode("utf-8", errors="replace")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _line_problem(values: list[float] | None, num_classes: int) -> str | None:
    """The report key a line is dropped under, or None for a good ``class cx cy w h`` line."""
    if values is None or len(values) != 5 or not all(math.isfinite(v) for v in values) \
            or not values[0].is_integer():
        return "malformed_label_lines_dropped"
    if not 0 <= values[0] < num_classes:
        return "class_out_of_range_dropped"
    if not all(-_TOLERANCE <= v <= 1 + _TOLERANCE for v in values[1:]):
        return "box_out_of_range_dropped"
    return None


def _floats(line: str) -> list[float] | None:
    try:
        return [float(v) for v in line.split()]
    except ValueError:
        return None


def _snap(v: float) -> float:
    """A normalised corner within _TOLERANCE of an edge, on it; others unchanged (the clip rule handles them)."""
    return min(max(v, 0.0), 1.0) if -_TOLERANCE <= v <= 1 + _TOLERANCE else v


def _to_pixels(cx: float, cy: float, w: float, h: float, info: ImageInfo) -> list[float]:
    """Normalised ``(cx, cy, w, h)`` -> absolute COCO ``[x, y, w, h]`` pixels of the image (float64)."""
    x0, x1, y0, y1 = _snap(cx - w / 2), _snap(cx + w / 2), _snap(cy - h / 2), _snap(cy + h / 2)
    return [x0 * info.width, y0 * info.height, (x1 - x0) * info.width, (y1 - y0) * info.height]


def _parse_label_file(path: Path, data: bytes, entry: dict, info: ImageInfo, num_classes: int,
                      report: dict, raise_on_bad: bool) -> list[dict]:
    """COCO-style annotations (absolute ``bbox``, no ``id`` yet) of one image's good lines; the rest counted."""
    annotations = []
    for number, line in _lines(data):
        values = _floats(line)
        problem = _line_problem(values, num_classes)
        if problem is None:
            bbox = _to_pixels(*values[1:], info)
            annotations.append({"image_id": entry["id"], "category_id": int(values[0]), "bbox": bbox, "iscrowd": 0})
            continue
        report[problem] += 1
        reason = _LINE_PROBLEMS[problem].format(last=num_classes - 1, count=num_classes)
        if raise_on_bad:
            raise ValueError(f"bad YOLO label {path}:{number}: {line!r}: {reason} "
                             "(use on_bad_data='skip' to skip and count such lines)")
        logger.debug("skipping bad YOLO label %s:%d: %r: %s", path, number, line, reason)
    return annotations


def _annotations(split: YoloSplit, entries: list[dict], labels: dict[str, bytes], images: dict[int, ImageInfo],
                 num_classes: int, report: dict, raise_on_bad: bool) -> list[dict]:
    """COCO-style annotations of every kept image, numbered from 1; label lines of skipped images are orphans."""
    annotations = []
    for entry in entries:
        data = labels.get(entry["stem"])
        if data is None:
            report["images_without_label_file"] += 1
        elif entry["id"] not in images:
            report["orphan_annotations_dropped"] += len(_lines(data))
        else:
            path = split.label_dir / f"{entry['stem']}.txt"
            annotations += _parse_label_file(path, data, entry, images[entry["id"]], num_classes, report,
                                             raise_on_bad)
    return [{**ann, "id": i} for i, ann in enumerate(annotations, start=1)]


# ----------------------------------------------------------------------------- loading


def _load_yolo_split(split: YoloSplit, names: list[str], yaml_bytes: bytes, raise_on_bad: bool,
                     full_decode_check: bool, cache_dir: str | None) -> tuple[datasets.Dataset, dict[str, int]]:
    """Check, clean and build one split (cached by the yaml, the label files and the image listing)."""
    labels = _read_labels(split)
    entries = _image_entries(split, labels)
    report = {k: 0 for k in YOLO_REPORT_KEYS}
    report["images"] = len(entries)
    report["annotations"] = sum(len(_lines(data)) for data in labels.values())
    checked = check_images(entries, split.image_dir, full_decode_check, report, raise_on_bad)
    images = {image_id: _displayed(info) for image_id, info in checked.items()}
    annotations = _annotations(split, entries, labels, images, len(names), report, raise_on_bad)
    identity = {label: label for label in range(len(names))}
    by_image = clean_annotations(annotations, images, {e["id"] for e in entries}, identity, report, raise_on_bad)
    finish_report(report, by_image)
    if not by_image:
        raise ValueError(f"split {split.name!r} ({split.image_dir}): no usable image; report: {report}")
    options = {"format": "yolo", "full_decode": full_decode_check, "split": split.name,
               "labels": str(split.label_dir)}
    key = fingerprint(split.image_dir, yaml_bytes + b"\0" + _labels_digest(labels), options)
    return build_split_dataset(split.name, by_image, images, names, key, cache_dir), report


def load_yolo_folder_with_info(yolo_dir: str | Path, on_bad_data: Literal["skip", "raise"] = "skip",
                               full_decode_check: bool = False, cache_dir: str | None = None) -> DetectionData:
    """Like :func:`load_yolo_folder`, also returning the label mapping and the per-split report."""
    if on_bad_data not in ("skip", "raise"):
        raise ValueError(f"on_bad_data must be 'skip' or 'raise', got {on_bad_data!r}")
    yaml_bytes, names, splits = read_data_yaml(yolo_dir)
    mapping: LabelMapping = label_mapping_from_categories([{"id": i, "name": n} for i, n in enumerate(names)],
                                                          contiguous_labels=True)
    out, reports = {}, {}
    for name, split in splits.items():
        out[name], reports[name] = _load_yolo_split(split, mapping.names, yaml_bytes, on_bad_data == "raise",
                                                    full_decode_check, cache_dir)
        log_report(name, reports[name])
    return DetectionData(DatasetDict(out), mapping, reports)


def load_yolo_folder(yolo_dir: str | Path, on_bad_data: Literal["skip", "raise"] = "skip",
                     full_decode_check: bool = False, cache_dir: str | None = None) -> DatasetDict:
    """Load an ultralytics YOLO folder as a :class:`datasets.DatasetDict` (schema: :mod:`.schema`).

    Args:
        yolo_dir: the folder holding ``data.yaml`` (or the yaml file itself); layout in the module docstring.
        on_bad_data: ``"skip"`` skips and counts missing/corrupt images and bad label lines (see
            :data:`YOLO_REPORT_KEYS`); ``"raise"`` raises ValueError on the first one, naming the file (and for
            a label line its number and text).
        full_decode_check: fully decode every image up-front (slow) to also catch truncated files.
        cache_dir: datasets cache folder; the cache key hashes data.yaml, every label file and the image
            folder listing, so editing any of them rebuilds the dataset.

    Use :func:`load_yolo_folder_with_info` to also get the label mapping and the report.
    """
    return load_yolo_folder_with_info(yolo_dir, on_bad_data, full_decode_check, cache_dir).dataset


# ----------------------------------------------------------------------------- writing


def yolo_label_line(label: int, box: Sequence[float], width: int, height: int) -> str:
    """``"class cx cy w h"`` of an absolute COCO ``[x, y, w, h]`` box, normalised by the image size.

    Enough decimals (6, more past 999 px) that the box read back is within 1e-3 px of ``box``.
    """
    x, y, w, h = (float(v) for v in box)
    digits = max(6, len(str(max(width, height))) + 3)
    values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
    return " ".join([str(int(label))] + [f"{v:.{digits}f}" for v in values])


def write_data_yaml(out_dir: str | Path, names: Sequence[str], splits: Sequence[str]) -> Path:
    """Write ``out_dir/data.yaml``: ``names`` as ``{id: name}`` and ``<split>: images/<split>`` for each split.

    No ``path:`` key, so the split folders are relative to the yaml's folder (for ultralytics too).
    """
    config = {**{split: f"images/{split}" for split in splits}, "nc": len(names), "names": dict(enumerate(names))}
    path = Path(out_dir) / "data.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
