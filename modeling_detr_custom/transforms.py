"""DETR's training augmentation on torch tensors, and the collate function that feeds the processor.

Not remote code: nothing in the model/config/processor files imports this module.

Conventions used by every function here:

* ``image``: ``uint8`` tensor ``(3, H, W)``, RGB.
* ``target``: dict of PER-BOX tensors, all with the same leading dimension ``n``:
  ``"boxes"`` float32 ``(n, 4)`` ABSOLUTE PIXEL ``(x0, y0, x1, y1)`` (xyxy, not COCO's xywh),
  plus any other per-box field (``"labels"`` int64 ``(n,)``, ``"area"`` float32 ``(n,)``,
  ``"iscrowd"`` int64 ``(n,)``, ...). Fields are indexed together when boxes are dropped.
  Non-tensor values are passed through untouched.
* Randomness comes from an optional ``torch.Generator`` (``None``: torch's global RNG), so a
  seeded generator gives the same augmentation every time.

The augmentation is the original DETR's (facebookresearch/detr ``datasets/coco.py``)::

    RandomHorizontalFlip(0.5)
    RandomSelect(                                   # p = 0.5 for the first
        RandomResize(scales, max_size),             # short side one of 480..800 step 32, long <= 1333
        Compose([RandomResize(crop_resize_scales),  # short side 400 / 500 / 600
                 RandomSizeCrop(crop_min, crop_max),  # each side in [384, 600]
                 RandomResize(scales, max_size)]))

:func:`scaled_train_transform_kwargs` scales all those sizes for small images (e.g. 128 px).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .data import objects_as_columns
from .image_processing_detr_custom import pil_to_rgb8

Target = dict[str, Any]
Transform = Callable[[Tensor, Target, "torch.Generator | None"], "tuple[Tensor, Target]"]

DEFAULT_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))  # 480, 512, ..., 800
DEFAULT_MAX_SIZE = 1333
DEFAULT_CROP_RESIZE_SCALES: tuple[int, ...] = (400, 500, 600)
DEFAULT_CROP_MIN, DEFAULT_CROP_MAX = 384, 600


# ----------------------------------------------------------------------------- random helpers


def _rand(generator: torch.Generator | None) -> float:
    """Uniform float in [0, 1)."""
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform int in [low, high], both INCLUSIVE (like Python's random.randint)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


# ----------------------------------------------------------------------------- deterministic ops


def _num_boxes(target: Target) -> int:
    return int(target["boxes"].shape[0]) if "boxes" in target else 0


def keep_boxes(target: Target, keep: Tensor) -> Target:
    """Index every per-box tensor of ``target`` with the bool mask ``keep`` (n,)."""
    n = _num_boxes(target)
    out = {}
    for key, value in target.items():
        if isinstance(value, Tensor):
            if value.shape[:1] != (n,):
                raise ValueError(f"target[{key!r}] has shape {tuple(value.shape)}; every tensor in a target must be per-box with leading dim {n}")
            value = value[keep]
        out[key] = value
    return out


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror left-right. image (3, H, W) uint8; boxes (n, 4) absolute xyxy follow the pixels."""
    width = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    return image.flip(-1), target


def get_size_with_aspect_ratio(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w): short side ``size``, long side at most ``max_size`` (original DETR's rounding)."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: Tensor, target: Target, size: int, max_size: int | None = None) -> tuple[Tensor, Target]:
    """Resize so the short side is ``size`` (long side <= ``max_size``); boxes (n, 4) xyxy and
    ``area`` (n,) scale with the pixels. Bilinear with antialiasing, on uint8 (like PIL's resize)."""
    h, w = image.shape[-2:]
    out_h, out_w = get_size_with_aspect_ratio(h, w, size, max_size)
    if (out_h, out_w) == (h, w):
        return image, target
    image = TF.resize(image, [out_h, out_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    ratio_w, ratio_h = out_w / w, out_h / h
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=target["boxes"].dtype)
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    return image, target


def crop(image: Tensor, target: Target, top: int, left: int, height: int, width: int) -> tuple[Tensor, Target]:
    """Cut the region rows top..top+height-1, cols left..left+width-1.

    Boxes (n, 4) xyxy are shifted and clipped to the region; boxes left with zero width or
    height are dropped together with all their fields. As in the original DETR, ``area``
    becomes the clipped box area.
    """
    image = image[..., top:top + height, left:left + width]
    if "boxes" not in target:
        return image, target
    target = dict(target)
    b = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    b = torch.minimum(b.reshape(-1, 2, 2), torch.tensor([width, height], dtype=b.dtype)).clamp(min=0)
    target["boxes"] = b.reshape(-1, 4)
    if "area" in target:
        target["area"] = (b[:, 1, :] - b[:, 0, :]).prod(dim=1)
    keep = (b[:, 1, :] > b[:, 0, :]).all(dim=1)
    return image, keep_boxes(target, keep)


# ----------------------------------------------------------------------------- random transforms


class Compose:
    """Apply transforms in order; each is ``t(image, target, generator) -> (image, target)``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    """:func:`hflip` with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        return hflip(image, target) if _rand(generator) < self.p else (image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """:func:`resize` to a short side drawn uniformly from ``sizes``, long side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        size = self.sizes[_randint(0, len(self.sizes) - 1, generator)]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Random crop with width in [min_size, min(W, max_size)] and height likewise, at a random place.

    ``min_size`` is lowered to the image side when the image is smaller (the original DETR
    never hits that case because it resizes to >= 400 px first).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        h, w = image.shape[-2:]
        # same draw order as the original: width, height, then top, left
        cw = _randint(min(self.min_size, w), min(w, self.max_size), generator)
        ch = _randint(min(self.min_size, h), min(h, self.max_size), generator)
        top, left = _randint(0, h - ch, generator), _randint(0, w - cw, generator)
        return crop(image, target, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Tensor, target: Target, generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        chosen = self.first if _rand(generator) < self.p else self.second
        return chosen(image, target, generator)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


def make_train_transforms(
    scales: Sequence[int] = DEFAULT_SCALES,
    max_size: int = DEFAULT_MAX_SIZE,
    crop_resize_scales: Sequence[int] = DEFAULT_CROP_RESIZE_SCALES,
    crop_min: int = DEFAULT_CROP_MIN,
    crop_max: int = DEFAULT_CROP_MAX,
) -> Compose:
    """DETR's training augmentation (module docstring); defaults are the original's COCO sizes."""
    return Compose([
        RandomHorizontalFlip(0.5),
        RandomSelect(
            RandomResize(scales, max_size),
            Compose([RandomResize(crop_resize_scales), RandomSizeCrop(crop_min, crop_max), RandomResize(scales, max_size)]),
            p=0.5,
        ),
    ])


def make_eval_transforms() -> Compose:
    """Identity: for evaluation the image processor does the resize (short side 800, long <= 1333)."""
    return Compose([])


def scaled_train_transform_kwargs(short_side: int) -> dict[str, Any]:
    """Kwargs for :func:`make_train_transforms` with every DETR size scaled by ``short_side / 800``.

    E.g. ``short_side=128`` gives scales 77..128, max_size 213, crop resize (64, 80, 96) and crops
    of 61..96 px. Pair it with a processor ``size={"shortest_edge": short_side, "longest_edge": max_size}``
    for evaluation.
    """
    f = short_side / 800
    return {
        "scales": tuple(sorted({round(s * f) for s in DEFAULT_SCALES})),
        "max_size": round(DEFAULT_MAX_SIZE * f),
        "crop_resize_scales": tuple(round(s * f) for s in DEFAULT_CROP_RESIZE_SCALES),
        "crop_min": max(1, round(DEFAULT_CROP_MIN * f)),
        "crop_max": max(1, round(DEFAULT_CROP_MAX * f)),
    }


# ----------------------------------------------------------------------------- dataset rows -> tensors


def pil_to_uint8_chw(image: Any) -> Tensor:
    """PIL image (any mode; 16-bit and float ones scaled, see `pil_to_rgb8`) or ``{"path"|"bytes"}`` dict ->
    RGB uint8 tensor (3, H, W).

    Dicts (``datasets.Image(decode=False)``) are opened WITHOUT applying EXIF rotation, like COCO.
    """
    what = "the image"
    if isinstance(image, Mapping):
        import io

        from PIL import Image

        what = image.get("path") or what
        image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
    return TF.pil_to_tensor(pil_to_rgb8(image, what))


def coco_objects_to_target(objects: Mapping[str, Sequence] | Sequence[Mapping], height: int, width: int, drop_crowd: bool = True) -> Target:
    """Dataset ``objects`` (bbox absolute COCO xywh; dict of lists or list of dicts) -> target
    with ``boxes`` (n, 4) absolute xyxy.

    As the original DETR: crowd boxes are dropped (if ``drop_crowd``), boxes are clipped to the
    image and boxes with zero width or height are dropped. Returns ``boxes`` float32 (n, 4),
    ``labels`` int64 (n,), ``area`` float32 (n,), ``iscrowd`` int64 (n,).
    """
    objects = objects_as_columns(objects)
    n = len(objects["bbox"])
    boxes = torch.tensor(objects["bbox"], dtype=torch.float32).reshape(n, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    area = objects.get("area")
    target = {
        "boxes": boxes,
        "labels": torch.tensor(list(objects["category"]), dtype=torch.int64).reshape(n),
        "area": torch.tensor(area, dtype=torch.float32).reshape(n) if area is not None else (boxes[:, 2:] - boxes[:, :2]).prod(1),
        "iscrowd": torch.tensor(list(objects.get("iscrowd") or [0] * n), dtype=torch.int64).reshape(n),
    }
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if drop_crowd:
        keep &= target["iscrowd"] == 0
    return keep_boxes(target, keep)


def target_to_coco_annotation(image_id: int, target: Target) -> dict[str, Any]:
    """Target (boxes absolute xyxy) -> the processor's COCO dict (bbox absolute xywh, category_id = label)."""
    boxes = target["boxes"].tolist()
    anns = [
        {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": int(label), "area": float(area), "iscrowd": int(crowd)}
        for (x0, y0, x1, y1), label, area, crowd in zip(boxes, target["labels"].tolist(), target["area"].tolist(), target["iscrowd"].tolist())
    ]
    return {"image_id": int(image_id), "annotations": anns}


class DetectionCollator:
    """Collate dataset rows (schema of :mod:`modeling_detr_custom.data`) into a DETR batch.

    Per row: image -> uint8 (3, H, W); ``objects`` (COCO xywh) -> xyxy target (crowd, empty
    boxes dropped); ``transforms`` (training augmentation); then ONE processor call for the batch.

    Returns the processor's ``BatchFeature``: ``pixel_values`` float32 (B, 3, H, W),
    ``pixel_mask`` int64 (B, H, W) (1 = real pixel, 0 = padding), ``labels``: list of B dicts
    with ``class_labels`` int64 (n,), ``boxes`` float32 (n, 4) (cx, cy, w, h) normalised by the
    image's UNPADDED size, ``size``/``orig_size`` int64 (2,) (h, w), ``image_id`` int64 (1,), ...

    Args:
        image_processor: a ``DetrCustomImageProcessor`` (or anything with its call API).
        transforms: e.g. :func:`make_train_transforms` for training; None for evaluation.
        resize_in_processor: let the processor resize (its ``size``). Default: only when
            ``transforms`` is None, since the training augmentation already resized.
        generator: seeded ``torch.Generator`` for reproducible augmentation in THIS process.
            Inside DataLoader worker processes it is ignored and the worker's own RNG is used
            (torch seeds each worker differently): a generator copied into every worker would
            repeat the same augmentations in each worker.
    """

    def __init__(
        self,
        image_processor: Any,
        transforms: Transform | None = None,
        resize_in_processor: bool | None = None,
        generator: torch.Generator | None = None,
        drop_crowd: bool = True,
    ) -> None:
        self.image_processor = image_processor
        self.transforms = transforms
        self.resize_in_processor = transforms is None if resize_in_processor is None else resize_in_processor
        self.generator = generator
        self.drop_crowd = drop_crowd

    def _generator(self) -> torch.Generator | None:
        return None if torch.utils.data.get_worker_info() is not None else self.generator

    def _prepare(self, row: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """One dataset row -> (uint8 (3, H, W) image, processor COCO annotation dict)."""
        image = pil_to_uint8_chw(row["image"])
        target = coco_objects_to_target(row["objects"], image.shape[-2], image.shape[-1], self.drop_crowd)
        if self.transforms is not None:
            image, target = self.transforms(image, target, self._generator())
        return image, target_to_coco_annotation(row["image_id"], target)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        images, annotations = zip(*(self._prepare(row) for row in rows))
        return self.image_processor(
            images=list(images), annotations=list(annotations), do_resize=self.resize_in_processor, return_tensors="pt"
        )


def make_collate_fn(
    image_processor: Any, train: bool = True, transforms: Transform | None = None, generator: torch.Generator | None = None
) -> DetectionCollator:
    """Collator for training (``transforms`` default :func:`make_train_transforms`) or evaluation
    (no augmentation; the processor resizes to its ``size``)."""
    if train and transforms is None:
        transforms = make_train_transforms()
    return DetectionCollator(image_processor, transforms if train else None, generator=generator)
