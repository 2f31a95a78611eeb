"""Synthetic COCO-format dataset of solid coloured shapes, for CPU-sized DETR experiments.

Not remote code: nothing in the model/config/processor files imports this module.

The output is a real COCO folder that pycocotools, torchvision's ``CocoDetection`` and
:func:`modeling_detr_custom.data.load_coco_folder` all read::

    out_dir/
      images/train/000001.png ...
      images/val/1000001.png ...
      annotations/instances_train.json
      annotations/instances_val.json

or, with ``format="yolo"``, the same images and boxes as an ultralytics YOLO folder
(:mod:`.yolo`): ``data.yaml``, ``images/<split>/``, ``labels/<split>/<stem>.txt``, classes ``0..K-1`` in
sorted category-id order (the labels of ``load_coco_folder(..., contiguous_labels=True)``).

Annotations follow COCO exactly: ``bbox`` is ``[x, y, w, h]`` in absolute pixels (top-left
corner plus size, so a box covering pixel columns 3..7 has ``x=3, w=5``), ``area`` is the
number of shape pixels (COCO's ``area`` is the mask area, not ``w*h``), ``iscrowd`` is 0,
and category ids start at 1. Shapes never overlap, so every box is tight around visible pixels.

Everything is deterministic given ``seed``: image ``i`` of a split depends only on
``(seed, split, i)``, so changing the number of images does not change the others.
:func:`synthetic_coco_dir` generates the built-in training dataset once into a cache folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from .yolo import write_data_yaml, yolo_label_line

logger = logging.getLogger(__name__)

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "bar")
# Shapes the demo's data never draws, for datasets of other classes (`shapes=`); SHAPE_NAMES stay the default.
OTHER_SHAPES: tuple[str, ...] = ("ring", "cross", "diamond")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient")
SPLITS: tuple[str, ...] = ("train", "val")
# Image ids of the val split start here, so ids are unique across splits as in COCO.
_SPLIT_ID_OFFSET = {"train": 0, "val": 1_000_000}


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape. ``bbox`` is COCO ``[x, y, w, h]`` in absolute pixels."""

    category_id: int
    bbox: tuple[int, int, int, int]
    area: int


def _background(rng: np.random.Generator, size: int, noise_std: float,
                kind: str = "solid") -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 image (size, size, 3), mean colour (3,)); half the images get noise.

    ``kind``: ``"solid"`` (one colour, the demo's) or ``"gradient"`` (a vertical blend of two colours that differ by
    at most 60 per channel, so a shape colour far from their mean stays visible)."""
    colour = rng.integers(0, 256, size=3)
    img = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        other = np.clip(colour + rng.integers(-60, 61, size=3), 0, 255)
        blend = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        img = (1 - blend) * colour.astype(np.float32) + blend * other.astype(np.float32)
        img = np.broadcast_to(img, (size, size, 3)).astype(np.float32)
        colour = (colour + other) // 2
    if noise_std > 0 and rng.random() < 0.5:
        img = img + rng.normal(0.0, noise_std, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), colour


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background (L1 >= 200) to be clearly visible."""
    for _ in range(100):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background).sum() >= 200:
            break
    else:  # pragma: no cover - practically unreachable; fall back to the inverse colour
        colour = 255 - background
    return tuple(int(c) for c in colour)


def _shape_extent(rng: np.random.Generator, shape: str, size: int) -> tuple[int, int]:
    """(w, h) of a shape's box: the long side is 15-50% of the image side."""
    lo, hi = max(4, round(0.15 * size)), max(5, round(0.5 * size))
    side = int(rng.integers(lo, hi + 1))
    if shape != "bar":
        return side, side
    short = max(3, side // 3)
    return (side, short) if rng.random() < 0.5 else (short, side)


def _draw_mask(shape: str, size: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` inscribed in pixels x..x+w-1, y..y+h-1."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x + w - 1, y + h - 1  # PIL's coordinates are inclusive
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(x + (w - 1) / 2, y), (x, y1), (x1, y1)], fill=255)
    elif shape == "ring":  # a circle with a hole of half its diameter
        draw.ellipse([x, y, x1, y1], fill=255)
        draw.ellipse([x + w // 4, y + h // 4, x1 - w // 4, y1 - h // 4], fill=0)
    elif shape == "cross":  # two bars of a third of the side through the centre
        t = max(1, w // 3)
        draw.rectangle([x + (w - t) // 2, y, x + (w - t) // 2 + t - 1, y1], fill=255)
        draw.rectangle([x, y + (h - t) // 2, x1, y + (h - t) // 2 + t - 1], fill=255)
    elif shape == "diamond":
        draw.polygon([(x + (w - 1) / 2, y), (x1, y + (h - 1) / 2), (x + (w - 1) / 2, y1), (x, y + (h - 1) / 2)],
                     fill=255)
    elif shape in ("square", "bar"):
        draw.rectangle([x, y, x1, y1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPE_NAMES + OTHER_SHAPES}")
    return np.asarray(mask) > 0


def _tight_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` of the True pixels of a (H, W) mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    """True if xywh ``box`` (grown by a 1 px margin) intersects any of ``others``."""
    x, y, w, h = box
    for ox, oy, ow, oh in others:
        if x - 1 < ox + ow and ox < x + w + 1 and y - 1 < oy + oh and oy < y + h + 1:
            return True
    return False


def _place_shape(
    rng: np.random.Generator, shape: str, size: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int] | None:
    """A random xywh placement of ``shape`` not overlapping ``taken``; None after 100 tries."""
    for _ in range(100):  # size is re-drawn each try, so small shapes fill the gaps
        w, h = _shape_extent(rng, shape, size)
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if not _overlaps((x, y, w, h), taken):
            return x, y, w, h
    return None


def generate_image(
    rng: np.random.Generator,
    image_size: int,
    min_shapes: int,
    max_shapes: int,
    category_ids: Sequence[int],
    noise_std: float = 8.0,
    shapes: Sequence[str] = SHAPE_NAMES,
    background: str = "solid",
) -> tuple[Image.Image, list[ShapeSpec]]:
    """Draw one RGB image (image_size x image_size) with 1..max_shapes non-overlapping shapes.

    ``category_ids[k]`` is the COCO category id of ``shapes[k]`` (default SHAPE_NAMES). A shape that cannot be
    placed without overlap after 100 tries is left out, so an image can hold fewer than
    ``min_shapes`` shapes in crowded settings (never fewer than one). ``background``: one of BACKGROUNDS.
    """
    pixels, bg_colour = _background(rng, image_size, noise_std, background)
    n = int(rng.integers(min_shapes, max_shapes + 1))
    taken: list[tuple[int, int, int, int]] = []
    specs: list[ShapeSpec] = []
    for _ in range(n):
        k = int(rng.integers(0, len(category_ids)))
        placed = _place_shape(rng, shapes[k], image_size, taken)
        if placed is None:
            continue
        taken.append(placed)
        mask = _draw_mask(shapes[k], image_size, *placed)
        pixels[mask] = _contrasting_colour(rng, bg_colour)
        specs.append(ShapeSpec(int(category_ids[k]), _tight_bbox(mask), int(mask.sum())))
    return Image.fromarray(pixels, mode="RGB"), specs


def _split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, split, image index)."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _draw_split(
    out_dir: Path, split: str, num_images: int, category_ids: Sequence[int], seed: int, draw_kwargs: dict
) -> Iterator[tuple[int, str, Image.Image, list[ShapeSpec]]]:
    """(image id, file name, image, shapes) of each image of the split, saved as ``images/<split>/<file name>``."""
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image_id = _SPLIT_ID_OFFSET[split] + i + 1
        img, specs = generate_image(_split_rng(seed, split, i), category_ids=category_ids, **draw_kwargs)
        file_name = f"{image_id:06d}.png"
        img.save(image_dir / file_name)
        yield image_id, file_name, img, specs


def _write_split(
    out_dir: Path, split: str, num_images: int, category_ids: Sequence[int], seed: int, draw_kwargs: dict
) -> Path:
    """Write ``images/<split>/*.png`` and ``annotations/instances_<split>.json``; return the json path."""
    images, annotations = [], []
    for image_id, file_name, img, specs in _draw_split(out_dir, split, num_images, category_ids, seed, draw_kwargs):
        images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
        for spec in specs:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": spec.category_id,
                                "bbox": [float(v) for v in spec.bbox], "area": float(spec.area), "iscrowd": 0})
    return _write_json(out_dir, split, images, annotations, category_ids, draw_kwargs.get("shapes", SHAPE_NAMES))


def _write_json(out_dir: Path, split: str, images: list, annotations: list, category_ids: Sequence[int],
                shapes: Sequence[str] = SHAPE_NAMES) -> Path:
    categories = [{"id": int(c), "name": shapes[k], "supercategory": "shape"} for k, c in enumerate(category_ids)]
    coco = {
        "info": {"description": f"detr-custom synthetic shapes ({split})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = out_dir / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def _write_yolo_split(
    out_dir: Path, split: str, num_images: int, category_ids: Sequence[int], seed: int, draw_kwargs: dict
) -> Path:
    """Write ``images/<split>/*.png`` and ``labels/<split>/*.txt`` (YOLO lines); return the label folder."""
    label_dir = out_dir / "labels" / split
    label_dir.mkdir(parents=True, exist_ok=True)
    labels = {c: label for label, c in enumerate(sorted(category_ids))}
    for _, file_name, img, specs in _draw_split(out_dir, split, num_images, category_ids, seed, draw_kwargs):
        lines = [yolo_label_line(labels[s.category_id], s.bbox, img.width, img.height) + "\n" for s in specs]
        (label_dir / f"{Path(file_name).stem}.txt").write_text("".join(lines))
    return label_dir


def make_synthetic_coco(
    out_dir: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    image_size: int = 128,
    min_shapes: int = 1,
    max_shapes: int = 3,
    num_classes: int = 3,
    seed: int = 0,
    noise_std: float = 8.0,
    category_ids: Sequence[int] | None = None,
    format: Literal["coco", "yolo"] = "coco",
    shapes: Sequence[str] | None = None,
    background: str = "solid",
) -> dict[str, Path]:
    """Write a synthetic COCO (or YOLO) folder to ``out_dir``; return ``{"train": path, "val": path}``.

    Args:
        num_classes: 1-4 shape classes, in the order circle, square, triangle, bar (or the first of ``shapes``).
        category_ids: COCO ids of those classes (default ``1..num_classes``); pass ids with
            gaps, e.g. ``(1, 3, 7)``, to mimic COCO's non-contiguous ids.
        noise_std: std of the Gaussian noise added to the background of half the images.
        format: ``"coco"`` (the paths returned are the annotation files) or ``"yolo"`` (the same
            images and boxes; the paths are the label folders, beside ``out_dir/data.yaml``).
        shapes: the shape kinds of the classes, in order (default SHAPE_NAMES; any of SHAPE_NAMES + OTHER_SHAPES,
            e.g. ``("ring", "cross", "diamond")`` for classes the default data never draws).
        background: ``"solid"`` (default) or ``"gradient"`` (a look the default data never has).
    """
    if format not in ("coco", "yolo"):
        raise ValueError(f"format must be 'coco' or 'yolo', got {format!r}")
    shapes = tuple(shapes) if shapes is not None else SHAPE_NAMES
    unknown = [s for s in shapes if s not in SHAPE_NAMES + OTHER_SHAPES]
    if unknown or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes must be distinct names of {SHAPE_NAMES + OTHER_SHAPES}, got {list(shapes)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if not 1 <= num_classes <= len(shapes):
        raise ValueError(f"num_classes must be in 1..{len(shapes)}, got {num_classes}")
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    ids = list(category_ids) if category_ids is not None else list(range(1, num_classes + 1))
    if len(ids) != num_classes or len(set(ids)) != num_classes or min(ids) < 1:
        raise ValueError(f"category_ids must be {num_classes} distinct ids >= 1, got {ids}")
    draw = dict(image_size=image_size, min_shapes=min_shapes, max_shapes=max_shapes, noise_std=noise_std)
    if shapes != SHAPE_NAMES or background != "solid":  # the default data is drawn exactly as before
        draw.update(shapes=shapes, background=background)
    counts = {"train": num_train, "val": num_val}
    write = _write_split if format == "coco" else _write_yolo_split
    paths = {split: write(Path(out_dir), split, counts[split], ids, seed, draw) for split in SPLITS}
    if format == "yolo":
        write_data_yaml(out_dir, [shapes[ids.index(c)] for c in sorted(ids)], SPLITS)
    return paths


# ----------------------------------------------------------------------------- the cached default dataset

# The built-in dataset when no dataset argument is given (scripts/make_synthetic_coco.py writes the same).
SYNTHETIC_DEFAULTS: dict[str, Any] = dict(num_train=2048, num_val=128, image_size=64, num_classes=3,
                                          min_shapes=1, max_shapes=3, seed=0)
_SYNTHETIC_VERSION = 1  # part of the cache folder name: bump when the same spec draws other images


def default_cache_dir() -> Path:
    """``$DETR_CUSTOM_CACHE`` or ``~/.cache/detr_custom``."""
    return Path(os.environ.get("DETR_CUSTOM_CACHE", Path.home() / ".cache" / "detr_custom"))


def synthetic_coco_dir(cache_dir: str | os.PathLike | None, spec: Mapping[str, Any] | None = None) -> Path:
    """Generate the synthetic shapes COCO folder once and return it (cached by its parameters).

    Written to a temporary folder and renamed, so an interrupted generation is never reused.
    Call under ``accelerator.main_process_first()`` with several processes.
    """
    spec = {**SYNTHETIC_DEFAULTS, **(spec or {})}
    name = ("v{}-train{num_train}-val{num_val}-px{image_size}-cls{num_classes}"
            "-shapes{min_shapes}to{max_shapes}-seed{seed}")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / "synthetic_coco" / name.format(_SYNTHETIC_VERSION, **spec)
    if (out / "annotations" / "instances_val.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generating the synthetic shapes dataset in %s", out)
    make_synthetic_coco(tmp, **spec)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out
