"""Ultralytics YOLO folders as detection datasets (schema: :mod:`.schema`), checked up-front and cached.

The layout (what ultralytics trains on)::

    yolo_dir/
      data.yaml               names: [circle, square] (or {0: circle, 1: square}); train: images/train; val: ...
      images/train/a.jpg ...  one folder per split (train, val, optional test), images at any depth
      labels/train/a.txt ...  the same tree: one "class cx cy w h" line per box, normalised to [0, 1]

Split paths are relative to the yaml's ``path:`` key when it has one (itself relative to the yaml's folder),
else to the yaml's folder; a ``../x`` path that does not exist is also tried as ``x`` (Roboflow exports), as
ultralytics does. A split is an image folder, a ``.txt`` file listing image paths (one a line; ``./x`` is relative
to the list's folder, as ultralytics reads it, and so is any relative path found there), or a yaml list of these.
Images are every image file under a folder at any depth (hidden folders skipped, as ultralytics' glob does), each
once, sorted by path; ``image_id`` is the position in that order, from 1. Each image's label file is found by
ultralytics' rule (:func:`label_path_for`): the last ``images`` folder of its path becomes ``labels`` and its
extension ``.txt`` (without an ``images`` folder, the ``.txt`` file sits beside the image).

Rows are those :func:`.coco.load_coco_folder` gives for the same images and boxes with ``contiguous_labels=True``:
absolute COCO ``[x, y, w, h]`` pixels, ``category`` = the YOLO class index (names from the yaml, identity
``label_to_category_id``), ``area`` = ``w * h`` (YOLO has no masks), ``iscrowd`` 0, ``id`` numbering the box
lines of the split that are kept, from 1 (as the synthetic COCO files number their annotations).
The images go through the COCO checks (:mod:`.coco_checks`: missing, corrupt, 16-bit, EXIF), with one
difference: YOLO labels are normalised in the EXIF-ROTATED frame (ultralytics reads images with the rotation
applied), so rotated images keep their file and the rotation ``datasets.Image`` applies when decoding, and
``width``/``height`` are the rotated size. There is no listed size, hence no size mismatch.

Label lines are read as ultralytics reads them:

* ``class cx cy w h`` (5 values) is a box; ``class x1 y1 ... xn yn`` (an odd count of at least 7) a segmentation
  polygon, read as its bounding box (``polygon_labels`` counts them); with a ``kpt_shape: [k, d]`` in the yaml
  (a pose dataset), a line of ``5 + k * d`` values is a box followed by keypoints, which are dropped;
* a file that mixes boxes and polygons is refused (ultralytics 8.4 refuses it; earlier versions read its boxes
  as 2-point polygons, i.e. wrongly), as is any line that is not such a box or polygon: another count of values
  (an extra confidence column, say), text, nan, a class that is not a whole number in ``0..K-1`` of the yaml's
  names, or a coordinate outside [0, 1] by more than ultralytics' 1% tolerance (pixel coordinates, typically).
  These raise ValueError whatever ``on_bad_data`` says, naming the file, the line and what is wrong, and how
  many lines of the split are like it: such a folder is not in the format read here, and skipping its lines
  would train on whatever is left;
* values in range whose box sticks out of the image (within the tolerance, or a box centred near an edge) are
  clipped to it by the one rule of :mod:`.boxes` and counted as ``boxes_clipped``, as for COCO boxes; corners
  within 1e-6 of an edge (rounding of the 6-decimal text) are snapped to it and not counted;
* a line repeating an earlier line of its file is dropped (``duplicate_labels_dropped``), as ultralytics does.

An image without a label file is a negative image (``images_without_label_file``, and
``images_without_annotations``); a label file in a split's label folder without an image is a ``missing_images``
entry (its lines are ``orphan_annotations_dropped``), except LabelImg's ``classes.txt``. Blank lines and a
UTF-8 byte-order mark are ignored.
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
    "polygon_labels",  # kept: segmentation polygons, read as their bounding box
    "duplicate_labels_dropped",  # a line repeating an earlier line of the same file (ultralytics drops them too)
)
SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")
_TOLERANCE = 1e-6  # normalised units: what 6-decimal text may round past an edge (snapped, not counted)
_RANGE_TOLERANCE = 0.01  # ultralytics accepts coordinates within 1% outside [0, 1] (and clips them)
_NOT_LABELS = ("classes.txt",)  # LabelImg writes the class list beside the labels
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXPECTED = "expected 5 (class cx cy w h) or a polygon (class x1 y1 ... xn yn)"


# ----------------------------------------------------------------------------- data.yaml


@dataclass
class YoloSplit:
    """One split of a YOLO folder: its image folders and ``.txt`` image lists, as data.yaml names them."""

    name: str
    sources: list[Path]


@dataclass
class YoloConfig:
    """What a YOLO folder's data.yaml says."""

    raw: bytes  # the file's bytes (part of the cache key)
    names: list[str]  # class names, indexed by class id
    splits: dict[str, YoloSplit]
    keypoint_columns: int | None  # 5 + k * d values on a pose dataset's lines (kpt_shape: [k, d]), else None


def _yaml_path(yolo_dir: Path) -> Path:
    """``yolo_dir`` itself when it is a yaml file, else its ``data.yaml`` (or ``data.yml``)."""
    if yolo_dir.is_file():
        return yolo_dir
    for name in ("data.yaml", "data.yml"):
        if (yolo_dir / name).is_file():
            return yolo_dir / name
    raise ValueError(f"no data.yaml in YOLO folder {yolo_dir}; expected names: and train:/val: image folders")


def read_data_yaml(yolo_dir: str | Path) -> YoloConfig:
    """What a YOLO folder's ``data.yaml`` (or that yaml file itself) says, its split paths resolved."""
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
    return YoloConfig(raw, _class_names(config, path), splits, _keypoint_columns(config, path))


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


def _keypoint_columns(config: dict, path: Path) -> int | None:
    """``5 + k * d`` for a pose dataset's ``kpt_shape: [k, d]`` (its lines are a box and k keypoints), else None."""
    shape = config.get("kpt_shape")
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape)
            and shape[0] > 0 and shape[1] in (2, 3)):
        raise ValueError(f"{path}: kpt_shape must be [keypoints, 2 or 3] (e.g. [17, 3]), got {shape!r:.200}")
    return 5 + shape[0] * shape[1]


def _split(root: Path, key: str, value: Any, path: Path) -> YoloSplit:
    """The split's image folders and image lists (see the module docstring for how they are resolved)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{path}: {key} must be an image folder or a .txt list of image paths, or a list of "
                         f"them, got {value!r:.200}")
    return YoloSplit(key, [_source(root, key, v, path) for v in values])


def _source(root: Path, key: str, value: str, path: Path) -> Path:
    """One image folder or ``.txt`` image list of a split; ``../x`` that does not exist is tried as ``x``."""
    source = root / value
    if not source.exists() and value.startswith("../") and (root / value[3:]).exists():
        source = root / value[3:]
    if not (source.is_dir() or (source.is_file() and source.suffix == ".txt")):
        raise ValueError(f"{path}: {key}: {value!r} -> {source} is not a folder or a .txt list of image paths; "
                         f"expected an image folder such as images/{key}")
    return source


def _swap_last(path: Path, old: str, new: str) -> Path:
    """``path`` with its last ``old`` folder renamed ``new`` (unchanged without one)."""
    parts = path.parts
    if old not in parts:
        return path
    last = len(parts) - 1 - parts[::-1].index(old)
    return Path(*parts[:last], new, *parts[last + 1:])


def label_dir_for(image_dir: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels`` (else: the same folder)."""
    return _swap_last(image_dir, "images", "labels")


def label_path_for(image: Path) -> Path:
    """An image's label file by ultralytics' rule (``img2label_paths``): ``.../images/a/b.jpg`` ->
    ``.../labels/a/b.txt``, the LAST ``images`` folder replaced; without one, ``b.txt`` beside the image."""
    return label_dir_for(image.parent) / f"{image.stem}.txt"


# ----------------------------------------------------------------------------- files of a split


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _hidden(path: Path, folder: Path) -> bool:
    """True for a path under a hidden folder (or a hidden file) of ``folder``: ultralytics' glob skips them."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _folder_files(folder: Path, keep: Any) -> list[Path]:
    """The files under ``folder`` at any depth for which ``keep(path)`` holds, hidden ones aside."""
    return [p for p in folder.rglob("*") if keep(p) and not _hidden(p, folder) and p.is_file()]


def _listed_images(list_file: Path) -> list[Path]:
    """The image paths of a ``.txt`` list: ``./x`` relative to the list's folder (ultralytics' rule), and so is
    another relative path found there (ultralytics takes those from the current folder: the fallback here)."""
    lines = [line.strip() for line in list_file.read_text(encoding="utf-8-sig").splitlines()]
    paths = []
    for line in filter(None, lines):
        path = Path(line)
        beside = list_file.parent / path
        keep_relative = not path.is_absolute() and not line.startswith("./") and not beside.exists() \
            and path.exists()
        paths.append(path.absolute() if keep_relative else beside)
    return [p for p in paths if _is_image(p)]


def _image_paths(split: YoloSplit) -> list[Path]:
    """Every image of the split, each once, sorted by path."""
    found: set[Path] = set()
    for source in split.sources:
        found.update(_folder_files(source, _is_image) if source.is_dir() else _listed_images(source))
    return sorted(found, key=str)


def _orphan_labels(split: YoloSplit, claimed: set[Path]) -> list[Path]:
    """Label files in the label folders of the split's image folders that no image claims (``classes.txt`` aside);
    warns about an image folder without a label folder (its images are all negatives)."""
    found: set[Path] = set()
    for folder in filter(Path.is_dir, split.sources):
        label_dir = label_dir_for(folder)
        if not label_dir.is_dir():
            logger.warning("split %s: no label folder %s; its images are all negatives", split.name, label_dir)
            continue
        found.update(_folder_files(label_dir, lambda p: p.suffix == ".txt" and p.name not in _NOT_LABELS))
    return sorted(found - claimed, key=str)


def _read_if_file(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _split_files(split: YoloSplit) -> tuple[list[dict], dict[Path, bytes]]:
    """(COCO-style ``images`` entries, label file bytes by path). Entries (``id``, ``file_name``: the image path,
    ``label``: its label path) are the images in order, then one per orphan label file, named ``<image>.*`` after
    the image it lacks (never a file, so :func:`check_images` finds it missing)."""
    images = _image_paths(split)
    entries = [{"id": i, "file_name": str(p), "label": label_path_for(p)} for i, p in enumerate(images, start=1)]
    orphans = _orphan_labels(split, {e["label"] for e in entries})
    lacking = [_swap_last(p.parent, "labels", "images") / f"{p.stem}.*" for p in orphans]
    entries += [{"id": len(entries) + i, "file_name": str(image), "label": label}
                for i, (image, label) in enumerate(zip(lacking, orphans), start=1)]
    labels = {e["label"]: data for e in entries if (data := _read_if_file(e["label"])) is not None}
    return entries, labels


def _files_digest(entries: list[dict], labels: dict[Path, bytes]) -> bytes:
    """Hash of every image path with its size and modification time, and of every label file's path and bytes
    (part of the cache key: a change to any image or label rebuilds the split)."""
    h = hashlib.sha256()
    for entry in entries:
        try:
            st = os.stat(entry["file_name"])
            h.update(f"{entry['file_name']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{entry['file_name']}\0missing\n".encode())
    for path, data in labels.items():
        h.update(f"{path}\0{len(data)}\0".encode() + data)
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


@dataclass(frozen=True)
class _Label:
    """One readable label line: a class and its normalised coordinates (hashable, to find repeated lines)."""

    category: int
    coords: tuple[float, ...]  # cx cy w h, or a polygon's x1 y1 ... xn yn

    @property
    def polygon(self) -> bool:
        return len(self.coords) > 4

    def corners(self) -> tuple[float, float, float, float]:
        """Normalised ``(x0, y0, x1, y1)``: the box's, or the polygon's bounding box (min/max of its points)."""
        if self.polygon:
            xs, ys = self.coords[0::2], self.coords[1::2]
            return _snap(min(xs)), _snap(min(ys)), _snap(max(xs)), _snap(max(ys))
        cx, cy, w, h = self.coords
        return _snap(cx - w / 2), _snap(cy - h / 2), _snap(cx + w / 2), _snap(cy + h / 2)


class _BadLine(ValueError):
    """A label line that is not YOLO; ``kind`` groups the lines counted together in the error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Problem:
    kind: str
    message: str  # one line naming the file (and line)
    path: Path


def _lines(data: bytes) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines (a UTF-8 byte-order mark ignored, as ultralytics)."""
    text = data.decode("utf-8-sig", errors="replace")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_line(line: str, num_classes: int, keypoint_columns: int | None) -> _Label:
    """The class and coordinates of one label line; :class:`_BadLine` when it is not a YOLO box or polygon."""
    tokens = line.split()
    if len(tokens) == keypoint_columns:  # a pose line: the box, keypoints dropped (ultralytics for a box task)
        tokens = tokens[:5]
    if len(tokens) != 5 and (len(tokens) < 7 or len(tokens) % 2 == 0):
        hint = " (a 6th column is typically a confidence: predictions are not labels)" if len(tokens) == 6 else ""
        raise _BadLine("columns", f"{len(tokens)} values; {_EXPECTED}{hint}")
    values = [_number(t) for t in tokens]
    return _Label(_category(values[0], num_classes), tuple(_normalised(values[1:])))


def _number(token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise _BadLine("numbers", f"{token!r} is not a number; {_EXPECTED}") from None
    if not math.isfinite(value):
        raise _BadLine("numbers", f"{token} is not a finite number")
    return value


def _category(value: float, num_classes: int) -> int:
    if not value.is_integer():
        raise _BadLine("class", f"class {value:g} is not a whole number")
    if not 0 <= value < num_classes:
        raise _BadLine("class", f"class {value:g} is not one of the {num_classes} classes of data.yaml's names "
                                f"(0..{num_classes - 1})")
    return int(value)


def _normalised(coords: list[float]) -> list[float]:
    """``coords`` when all lie in [0, 1] give or take ultralytics' 1% tolerance, else :class:`_BadLine`."""
    outside = [v for v in coords if not -_RANGE_TOLERANCE <= v <= 1 + _RANGE_TOLERANCE]
    if outside:
        looks = "these look like pixel coordinates; " if max(outside) > 1 else ""
        raise _BadLine("range", f"{outside[0]:g} is outside [0, 1]: {looks}YOLO coordinates are normalised by the "
                                "image width and height")
    return coords


def _snap(v: float) -> float:
    """A normalised corner within _TOLERANCE of an edge, on it; others unchanged (the clip rule handles them)."""
    return min(max(v, 0.0), 1.0) if -_TOLERANCE <= v <= 1 + _TOLERANCE else v


def _to_pixels(corners: tuple[float, float, float, float], info: ImageInfo) -> list[float]:
    """Normalised ``(x0, y0, x1, y1)`` -> absolute COCO ``[x, y, w, h]`` pixels of the image (float64)."""
    x0, y0, x1, y1 = corners
    return [x0 * info.width, y0 * info.height, (x1 - x0) * info.width, (y1 - y0) * info.height]


def _read_label_file(path: Path, data: bytes, num_classes: int, keypoint_columns: int | None, report: dict,
                     problems: list[_Problem]) -> list[_Label]:
    """The file's labels, each once (repeats counted); its unreadable lines, or its mixing boxes and polygons,
    added to ``problems``."""
    labels: dict[_Label, int] = {}  # label -> its line number (dicts keep file order)
    for number, line in _lines(data):
        try:
            label = _parse_line(line, num_classes, keypoint_columns)
        except _BadLine as bad:
            problems.append(_Problem(bad.kind, f"{path} line {number}: {bad}", path))
            continue
        report["duplicate_labels_dropped"] += int(label in labels)
        labels.setdefault(label, number)
    first = {label.polygon: number for label, number in reversed(labels.items())}
    if len(first) == 2:
        problems.append(_Problem("mixed", f"{path}: line {first[False]} is a box and line {first[True]} a polygon; "
                                 "ultralytics refuses label files that mix the two (earlier versions misread the "
                                 "boxes as 2-point polygons): write one kind per file", path))
    return list(labels)


def _raise_problems(problems: list[_Problem], split: str, total_lines: int) -> None:
    """One ValueError naming the first problem and how many lines (or files) of the split share its kind."""
    if not problems:
        return
    first = problems[0]
    same = [p for p in problems if p.kind == first.kind]
    files = len({p.path for p in same})
    counted = f"{files} of the split's label files" if first.kind == "mixed" else \
        f"{len(same)} of the split's {total_lines} label lines, in {files} file(s),"
    others = f"; {len(problems) - len(same)} other problem(s)" if len(problems) > len(same) else ""
    raise ValueError(f"{first.message} ({counted} are like this in split {split!r}{others})")


def _annotations(split: str, entries: list[dict], labels: dict[Path, bytes], images: dict[int, ImageInfo],
                 config: YoloConfig, report: dict) -> list[dict]:
    """COCO-style annotations of every kept image, numbered from 1; label lines of skipped images are orphans.
    Raises ValueError if any label file read is not YOLO (:func:`_raise_problems`)."""
    annotations, problems = [], []
    for entry in entries:
        data = labels.get(entry["label"])
        if data is None:
            report["images_without_label_file"] += 1
        elif entry["id"] not in images:
            report["orphan_annotations_dropped"] += len(_lines(data))
        else:
            info = images[entry["id"]]
            read = _read_label_file(entry["label"], data, len(config.names), config.keypoint_columns, report,
                                    problems)
            report["polygon_labels"] += sum(label.polygon for label in read)
            annotations += [{"image_id": entry["id"], "category_id": label.category, "iscrowd": 0,
                             "bbox": _to_pixels(label.corners(), info)} for label in read]
    _raise_problems(problems, split, report["annotations"])
    return [{**ann, "id": i} for i, ann in enumerate(annotations, start=1)]


# ----------------------------------------------------------------------------- loading


def _load_yolo_split(split: YoloSplit, config: YoloConfig, raise_on_bad: bool, full_decode_check: bool,
                     cache_dir: str | None) -> tuple[datasets.Dataset, dict[str, int]]:
    """Check, clean and build one split (cached by the yaml, the label files and the image listing)."""
    entries, labels = _split_files(split)
    report = {k: 0 for k in YOLO_REPORT_KEYS}
    report["images"] = len(entries)
    report["annotations"] = sum(len(_lines(data)) for data in labels.values())
    checked = check_images(entries, split.sources[0], full_decode_check, report, raise_on_bad)
    images = {image_id: _displayed(info) for image_id, info in checked.items()}
    annotations = _annotations(split.name, entries, labels, images, config, report)
    identity = {label: label for label in range(len(config.names))}
    by_image = clean_annotations(annotations, images, {e["id"] for e in entries}, identity, report, raise_on_bad)
    finish_report(report, by_image)
    if not by_image:
        raise ValueError(f"split {split.name!r} ({', '.join(map(str, split.sources))}): no usable image; "
                         f"report: {report}")
    options = {"format": "yolo", "full_decode": full_decode_check, "split": split.name,
               "sources": [str(s) for s in split.sources], "keypoint_columns": config.keypoint_columns}
    listed = split.sources[0] if split.sources[0].is_dir() else split.sources[0].parent
    key = fingerprint(listed, config.raw + b"\0" + _files_digest(entries, labels), options)
    return build_split_dataset(split.name, by_image, images, config.names, key, cache_dir), report


def load_yolo_folder_with_info(yolo_dir: str | Path, on_bad_data: Literal["skip", "raise"] = "skip",
                               full_decode_check: bool = False, cache_dir: str | None = None) -> DetectionData:
    """Like :func:`load_yolo_folder`, also returning the label mapping and the per-split report."""
    if on_bad_data not in ("skip", "raise"):
        raise ValueError(f"on_bad_data must be 'skip' or 'raise', got {on_bad_data!r}")
    config = read_data_yaml(yolo_dir)
    mapping: LabelMapping = label_mapping_from_categories([{"id": i, "name": n} for i, n in enumerate(config.names)],
                                                          contiguous_labels=True)
    out, reports = {}, {}
    for name, split in config.splits.items():
        out[name], reports[name] = _load_yolo_split(split, config, on_bad_data == "raise", full_decode_check,
                                                    cache_dir)
        log_report(name, reports[name])
    return DetectionData(DatasetDict(out), mapping, reports)


def load_yolo_folder(yolo_dir: str | Path, on_bad_data: Literal["skip", "raise"] = "skip",
                     full_decode_check: bool = False, cache_dir: str | None = None) -> DatasetDict:
    """Load an ultralytics YOLO folder as a :class:`datasets.DatasetDict` (schema: :mod:`.schema`).

    Args:
        yolo_dir: the folder holding ``data.yaml`` (or the yaml file itself); layout in the module docstring.
        on_bad_data: ``"skip"`` skips and counts missing/corrupt images (see :data:`YOLO_REPORT_KEYS`);
            ``"raise"`` raises ValueError on the first one, naming the file. Label lines that are not YOLO
            raise ValueError either way, naming the file and the line.
        full_decode_check: fully decode every image up-front (slow) to also catch truncated files.
        cache_dir: datasets cache folder; the cache key hashes data.yaml, every label file and the path, size
            and modification time of every image, so editing any of them rebuilds the dataset.

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
