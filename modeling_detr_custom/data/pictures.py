"""See your data: sample images with their boxes and class names, drawn by the one drawing of detections
(:func:`..drawing.detection_sheet`, that of ``detections.png``), so that a wrong box format shows at a glance.

* :func:`data_picture`: rows as stored (boxes as the dataset holds them, COCO xywh pixels of the stored image);
* :func:`training_inputs_picture`: the same rows as the model sees them in training: the collator's batch (the
  train transforms of epoch 0, the processor's resize), un-normalised, unpadded, with its normalised cxcywh targets
  drawn back in pixels. A box that is right in the first picture and wrong in the second is a pipeline bug.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import PIL.Image
import torch

from ..drawing import detection_sheet
from ..image_processing_detr_custom import _affine_constants
from .boxes import cxcywh_to_xyxy, xywh_to_xyxy
from .collate import DetrCollator
from .schema import objects_as_columns


def sample_rows(dataset: datasets.Dataset, num_images: int) -> list[dict[str, Any]]:
    """The first ``num_images`` rows (images undecoded: the collator decodes them and survives bad files)."""
    rows = dataset.select(range(min(num_images, len(dataset))))
    if "image" in rows.column_names:
        rows = rows.cast_column("image", datasets.Image(decode=False))
    return list(rows)


def data_picture(rows: Sequence[Mapping[str, Any]], id2label: Mapping[int, str]) -> PIL.Image.Image:
    """The rows' images side by side with their stored boxes, each tagged with its class name."""
    images, boxes = [], []
    for row in rows:
        image, objects = DetrCollator.decode(row)
        images.append(PIL.Image.fromarray(image.permute(1, 2, 0).numpy()))
        columns = objects_as_columns(objects)
        xywh = torch.tensor(columns["bbox"], dtype=torch.float64).reshape(-1, 4)
        boxes.append({"boxes": xywh_to_xyxy(xywh), "labels": list(columns["category"])})
    return detection_sheet(images, boxes, id2label)


def training_inputs_picture(rows: Sequence[Mapping[str, Any]], collator: DetrCollator,
                            id2label: Mapping[int, str]) -> PIL.Image.Image:
    """The rows as the collator hands them to the model (see the module docstring), with their targets."""
    collator.set_epoch(0)
    batch = collator(list(rows))
    processor = collator.image_processor
    scale, bias = _affine_constants(True, processor.do_rescale, processor.rescale_factor, processor.do_normalize,
                                    processor.image_mean, processor.image_std, torch.device("cpu"))
    images, targets = [], []
    for pixels, label in zip(batch["pixel_values"], batch["labels"]):
        height, width = (int(v) for v in label["size"])
        uint8 = ((pixels[:, :height, :width] - bias) / scale).round().clamp(0, 255).to(torch.uint8)
        uint8 = uint8[:3] if uint8.shape[0] >= 3 else uint8[:1].expand(3, -1, -1)
        images.append(PIL.Image.fromarray(uint8.permute(1, 2, 0).numpy()))
        size = torch.tensor([width, height, width, height], dtype=torch.float32)
        targets.append({"boxes": cxcywh_to_xyxy(label["boxes"].float()) * size, "labels": label["class_labels"]})
    return detection_sheet(images, targets, id2label)


__all__ = ["data_picture", "sample_rows", "training_inputs_picture"]
