"""DETR's training augmentation on torch tensors.

Not remote code: nothing in the model/config/processor files imports this module.

Conventions used by every function here:

* ``image``: ``uint8`` tensor ``(3, H, W)``, RGB.
* ``target``: dict of PER-BOX tensors, all with the same leading dimension ``n``:
  ``"boxes"`` float32 ``(n, 4)`` ABSOLUTE PIXEL ``(x0, y0, x1, y1)`` (xyxy, not COCO's xywh),
  plus any other per-box field (``"class_labels"`` int64 ``(n,)``, the model class id, see :mod:`.schema`;
  ``"area"`` float32 ``(n,)``, ``"iscrowd"`` int64 ``(n,)``, ...). Fields are indexed together when boxes
  are dropped. Non-tensor values are passed through untouched.
* Randomness comes from an optional ``torch.Generator`` (``None``: torch's global RNG), so a
  seeded generator gives the same augmentation every time.

The augmentation is the original DETR's (facebookresearch/detr ``datasets/coco.py``)::

    RandomHorizontalFlip(0.5)
    RandomSelect(                                   # p = 0.5 for the first
        RandomResize(scales, max_size),             # short side one of 480..800 step 32, long <= 1333
        Compose([RandomResize(crop_resize_scales),  # short side 400 / 500 / 600
                 RandomSizeCrop(crop_min, crop_max),  # each side in [384, 600]
                 RandomResize(scales, max_size)]))

:func:`scaled_train_transform_kwargs` scales all those sizes for small images (e.g. 128 px). Output sizes
follow the image processor's rule (``get_size_with_aspect_ratio``, transformers' arithmetic): when the long side
limit applies, the long side can be one pixel longer than the original DETR's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ..image_processing_detr_custom import get_size_with_aspect_ratio
from .boxes import box_area, clip_to_image, has_area

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
                raise ValueError(f"target[{key!r}] has shape {tuple(value.shape)}; every tensor in a target "
                                 f"must be per-box with leading dim {n}")
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


def vflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror top-bottom. image (3, H, W) uint8; boxes (n, 4) absolute xyxy follow the pixels."""
    height = image.shape[-2]
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([b[:, 0], height - b[:, 3], b[:, 2], height - b[:, 1]], dim=1)
    return image.flip(-2), target


def resize(image: Tensor, target: Target, size: int, max_size: int | None = None) -> tuple[Tensor, Target]:
    """Resize so the short side is ``size`` (long side <= ``max_size``); boxes (n, 4) xyxy and
    ``area`` (n,) scale with the pixels. Bilinear with antialiasing, on uint8 (like PIL's resize)."""
    h, w = image.shape[-2:]
    out_h, out_w = get_size_with_aspect_ratio((h, w), size, max_size)
    if (out_h, out_w) == (h, w):
        return image, target
    image = TF.resize(image, [out_h, out_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    ratio_w, ratio_h = out_w / w, out_h / h
    target = dict(target)
    if "boxes" in target:
        ratios = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * ratios
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
    shifted = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    target["boxes"] = clip_to_image(shifted, width, height)
    if "area" in target:
        target["area"] = box_area(target["boxes"])
    return image, keep_boxes(target, has_area(target["boxes"]))


# ----------------------------------------------------------------------------- random transforms


class Compose:
    """Apply transforms in order; each is ``t(image, target, generator) -> (image, target)``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class _WithProbability:
    """Its ``apply`` with probability ``p`` (one draw from the generator per call), else the input unchanged."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, target: Target,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
        return self.apply(image, target, generator) if _rand(generator) < self.p else (image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomHorizontalFlip(_WithProbability):
    """:func:`hflip` with probability ``p``."""

    def apply(self, image: Tensor, target: Target, generator: torch.Generator | None) -> tuple[Tensor, Target]:
        return hflip(image, target)


class RandomVerticalFlip(_WithProbability):
    """:func:`vflip` with probability ``p`` (ultralytics' ``flipud``): for data whose classes do not depend on
    which way is up."""

    def apply(self, image: Tensor, target: Target, generator: torch.Generator | None) -> tuple[Tensor, Target]:
        return vflip(image, target)


class RandomChannelShuffle(_WithProbability):
    """With probability ``p``, the RGB channels in a random order (the identity among them): for data whose classes
    do not depend on colour. Boxes are untouched."""

    def apply(self, image: Tensor, target: Target, generator: torch.Generator | None) -> tuple[Tensor, Target]:
        return image[torch.randperm(3, generator=generator)], target


class RandomResize:
    """:func:`resize` to a short side drawn uniformly from ``sizes``, long side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError(f"RandomResize needs at least one size, got {sizes!r}")
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image: Tensor, target: Target,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
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

    def __call__(self, image: Tensor, target: Target,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
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

    def __call__(self, image: Tensor, target: Target,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Target]:
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
    fliplr: float = 0.5,
    flipud: float = 0.0,
    channel_shuffle: float = 0.0,
) -> Compose:
    """DETR's training augmentation (module docstring); defaults are the original's COCO sizes and flip. A vertical
    flip and a channel shuffle (`make_flip_colour_transforms`) come before the resize when asked for."""
    crop_branch = Compose([RandomResize(crop_resize_scales), RandomSizeCrop(crop_min, crop_max),
                           RandomResize(scales, max_size)])
    return Compose([*make_flip_colour_transforms(fliplr, flipud, channel_shuffle),
                    RandomSelect(RandomResize(scales, max_size), crop_branch, p=0.5)])


def make_flip_colour_transforms(fliplr: float = 0.0, flipud: float = 0.0,
                                channel_shuffle: float = 0.0) -> list[Transform]:
    """The flips and the colour change with a non-zero probability, in that order (no resize: the image keeps its
    size, so they suit small images that DETR's multi-scale crops would shrink below the backbone's stride)."""
    chosen = [(fliplr, RandomHorizontalFlip), (flipud, RandomVerticalFlip), (channel_shuffle, RandomChannelShuffle)]
    return [transform(p) for p, transform in chosen if p > 0]


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
