"""Dataset rows -> DETR batches: the collator, the seeded epoch sampler, and the row -> target steps.

A row (schema of :mod:`.schema`) becomes a batch in four steps: decode the image to uint8 ``(3, H, W)``
(:func:`pil_to_uint8_chw`), turn ``objects`` into an augmentation target (:func:`coco_objects_to_target`),
augment (:mod:`.transforms`), and hand the processor a COCO annotation (:func:`target_to_coco_annotation`);
one processor call then pads the batch and normalises the boxes. Augmentation randomness depends only on
``(seed, epoch, image_id)``, so a run is reproducible across resumes, dataloader workers and process counts.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Sampler
from torchvision.transforms.v2 import functional as TF

from ..image_processing_detr_custom import DetrCustomImageProcessor, pil_to_rgb8
from .boxes import box_area, clip_to_image, has_area, xywh_to_xyxy, xyxy_to_xywh
from .schema import objects_as_columns
from .transforms import Compose, Target, keep_boxes

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- dataset rows -> tensors


def without_image_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    """Rows yield ``{"path", "bytes"}`` for the image: the collator decodes (and survives bad files)."""
    return dataset.cast_column("image", datasets.Image(decode=False))


def pil_to_uint8_chw(image: Any) -> Tensor:
    """PIL image (any mode; 16-bit and float ones scaled, see `pil_to_rgb8`) or ``{"path"|"bytes"}`` dict ->
    RGB uint8 tensor (3, H, W).

    Dicts (``datasets.Image(decode=False)``) are opened WITHOUT applying EXIF rotation, like COCO.
    """
    what = "the image"
    if isinstance(image, Mapping):
        what = image.get("path") or what
        image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
    return TF.pil_to_tensor(pil_to_rgb8(image, what))


def coco_objects_to_target(objects: Mapping[str, Sequence] | Sequence[Mapping], height: int, width: int,
                           drop_crowd: bool = True) -> Target:
    """A row's ``objects`` (``bbox`` absolute COCO xywh; dict of lists or list of dicts) -> augmentation target.

    As the original DETR: crowd boxes are dropped (if ``drop_crowd``), boxes are clipped to the image and boxes
    with zero width or height are dropped (:mod:`.boxes`; Hub datasets are not checked up-front). Returns
    ``boxes`` float32 (n, 4) absolute pixel (x0, y0, x1, y1), ``class_labels`` int64 (n,) (the row's
    ``category``), ``area`` float32 (n,) (the clipped box area when the row has none), ``iscrowd`` int64 (n,).
    """
    objects = objects_as_columns(objects)
    n = len(objects["bbox"])
    xywh = torch.tensor(objects["bbox"], dtype=torch.float32).reshape(n, 4)
    boxes = clip_to_image(xywh_to_xyxy(xywh), width, height)
    area = objects.get("area")
    target = {
        "boxes": boxes,
        "class_labels": torch.tensor(list(objects["category"]), dtype=torch.int64).reshape(n),
        "area": torch.tensor(area, dtype=torch.float32).reshape(n) if area is not None else box_area(boxes),
        "iscrowd": torch.tensor(list(objects.get("iscrowd") or [0] * n), dtype=torch.int64).reshape(n),
    }
    keep = has_area(boxes)
    if drop_crowd:
        keep &= target["iscrowd"] == 0
    return keep_boxes(target, keep)


def target_to_coco_annotation(image_id: int, target: Target) -> dict[str, Any]:
    """Augmentation target -> the processor's COCO annotation dict: ``bbox`` absolute [x, y, w, h] pixels,
    ``category_id`` = the target's ``class_labels`` (the processor copies it into its ``class_labels``)."""
    boxes = xyxy_to_xywh(target["boxes"].double()).tolist()  # float64: the widths Python floats gave
    columns = zip(boxes, target["class_labels"].tolist(), target["area"].tolist(), target["iscrowd"].tolist())
    anns = [{"bbox": box, "category_id": int(label), "area": float(area), "iscrowd": int(crowd)}
            for box, label, area, crowd in columns]
    return {"image_id": int(image_id), "annotations": anns}


# ----------------------------------------------------------------------------- sampling


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (no collisions like seed + epoch would give)."""
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    No hidden generator state: resuming at epoch e, batch b only needs e and b (then
    `accelerator.skip_first_batches`). Deliberately has no ``generator`` attribute, so accelerate
    does not try to synchronise one across processes: every process computes the same order and
    accelerate's batch sharding gives each its own batches.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


# ----------------------------------------------------------------------------- the collator


class DetrCollator:
    """Dataset rows (schema of :mod:`.schema`, image decoded or not) -> a DETR batch.

    Per row: decode to uint8 (3, H, W) without EXIF rotation (COCO boxes are in raw pixels);
    ``objects`` (absolute COCO xywh) -> absolute xyxy target (crowd and empty boxes dropped);
    the augmentation with a generator seeded by ``(seed, epoch, image_id)``; then one processor
    call for the batch, which pads and normalises the boxes to cxcywh by each UNPADDED size.
    Without ``transforms`` the processor resizes to its ``size`` (evaluation).

    An image that cannot be decoded (a truncated file the up-front check missed) becomes a grey
    image of its recorded size with no objects, with a warning: a crash in the middle of an
    epoch, or a process skipping a step that the others take, would be worse.

    Returns the processor's `BatchFeature`: ``pixel_values`` (B, 3, H, W) float32,
    ``pixel_mask`` (B, H, W) int64 (1 = real pixel), ``labels`` (B dicts: ``class_labels`` (n,),
    ``boxes`` (n, 4) normalised cxcywh, ``orig_size``/``size`` (2,) (h, w), ``image_id`` (1,)).
    """

    def __init__(self, image_processor: DetrCustomImageProcessor, transforms: Compose | None = None,
                 seed: int = 0, drop_crowd: bool = True) -> None:
        self.image_processor, self.transforms = image_processor, transforms
        self.seed, self.drop_crowd, self.epoch = seed, drop_crowd, 0

    def set_epoch(self, epoch: int) -> None:
        """Call before creating the epoch's iterator: worker processes get a copy at that moment."""
        self.epoch = int(epoch)

    @staticmethod
    def decode(row: Mapping[str, Any]) -> tuple[Tensor, Mapping[str, Any]]:
        """(uint8 (3, H, W) image, objects); unreadable images -> grey image, no objects."""
        try:
            return pil_to_uint8_chw(row["image"]), row["objects"]
        except Exception as err:  # noqa: BLE001 - any decode failure is handled the same way
            height, width = int(row.get("height") or 64), int(row.get("width") or 64)
            logger.warning("image %s cannot be decoded (%s); using an empty %dx%d image with no objects "
                           "(--full_decode_check finds such files before training)", row.get("image_id"), err,
                           height, width)
            return torch.full((3, height, width), 114, dtype=torch.uint8), {"bbox": [], "category": []}

    def prepare(self, row: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """One row -> (uint8 (3, H, W) image, the processor's COCO annotation dict)."""
        image, objects = self.decode(row)
        target = coco_objects_to_target(objects, image.shape[-2], image.shape[-1], self.drop_crowd)
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, int(row["image_id"])))
            image, target = self.transforms(image, target, generator)
        return image, target_to_coco_annotation(int(row["image_id"]), target)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        images, annotations = zip(*(self.prepare(row) for row in rows))
        return self.image_processor(images=list(images), annotations=list(annotations),
                                    do_resize=self.transforms is None, return_tensors="pt")
