"""The one drawing of detections (`modeling_detr_custom.drawing`): per image (predict.py's PNGs) and the sheet
of a training run (detections.png), predictions in their label's colour with a tag, ground truth in green."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_detr_custom.drawing import (
    GROUND_TRUTH_COLOUR,
    LEGEND_ROW_HEIGHT,
    TILE_GAP,
    detection_sheet,
    draw_detections,
    label_colour,
    line_width,
)

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
GREY = 128


def _share(pixels: np.ndarray, colour: tuple[int, int, int], ys, xs) -> float:
    """Share of the pixels at [ys, xs] that have exactly ``colour``."""
    return float(np.all(pixels[ys, xs] == colour, axis=-1).mean())


def _grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (GREY,) * 3)


def test_each_box_is_outlined_in_its_label_colour_with_a_filled_tag() -> None:
    image = _grey(200, 150)
    boxes = [[20, 40, 90, 120], [110, 5, 190, 60]]
    detections = {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor([0.9, 0.8]),
                  "labels": torch.tensor([0, 1])}  # post_process_object_detection's tensors
    pixels = np.asarray(draw_detections(image, detections, ID2LABEL))
    width = line_width(image.size)
    for label, (x0, y0, x1, y1) in enumerate(boxes):
        colour = label_colour(label)
        for offset in range(width):  # the outline is `width` px thick, inside the box
            assert _share(pixels, colour, slice(y0, y1 + 1), x0 + offset) == 1.0
            assert _share(pixels, colour, slice(y0, y1 + 1), x1 - offset) == 1.0
            assert _share(pixels, colour, y1 - offset, slice(x0, x1 + 1)) == 1.0
        inside = pixels[y0 + 30:y1 - width, x0 + width:x1 - width + 1]  # below where a tag can be
        assert np.all(inside == GREY)
    # the first box's tag sits just above it: a filled block of its colour with text in black or white
    tag = pixels[40 - 12:40, 20:60]
    text = ((tag.min(axis=-1) > 200) | (tag.max(axis=-1) < 60)).mean()  # anti-aliased white or black strokes
    assert _share(tag, label_colour(0), slice(None), slice(None)) > 0.4 and text > 0.02
    # the second box touches the top edge: its tag goes inside the box instead of off the image
    assert _share(pixels, label_colour(1), slice(5, 18), slice(110, 150)) > 0.4
    assert len({label_colour(i) for i in range(12)}) == 12  # a distinct colour per label
    assert np.all(np.asarray(image) == GREY)  # the input is left as it was


def test_ground_truth_is_a_thin_green_outline_under_the_predictions() -> None:
    image = _grey(120, 100)
    nothing = {"boxes": [], "scores": [], "labels": []}
    assert not np.all(np.asarray(draw_detections(image, nothing, ID2LABEL)) == GROUND_TRUTH_COLOUR, axis=-1).any()
    pixels = np.asarray(draw_detections(image, nothing, ID2LABEL, ground_truth=[[10, 20, 50, 30]]))  # COCO xywh
    assert _share(pixels, GROUND_TRUTH_COLOUR, slice(20, 51), 10) == 1.0
    assert _share(pixels, GROUND_TRUTH_COLOUR, 50, slice(10, 61)) == 1.0
    assert _share(pixels, GROUND_TRUTH_COLOUR, slice(21, 50), 11) == 0.0  # 1 px wide
    on_top = {"boxes": [[10, 20, 60, 50]], "scores": [0.5], "labels": [2]}  # the same box, predicted
    pixels = np.asarray(draw_detections(image, on_top, ID2LABEL, ground_truth=[[10, 20, 50, 30]]))
    assert _share(pixels, label_colour(2), 50, slice(10, 61)) == 1.0


def test_sheet_puts_the_upscaled_images_side_by_side_with_boxes_scaled_and_a_legend() -> None:
    images = [_grey(64, 32), _grey(100, 300)]  # short sides 32 (x4 to 128) and 100 (x1.28)
    detections = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 12.0]]), "scores": torch.tensor([0.7]),
                   "labels": torch.tensor([1])},
                  {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=int)}]
    truth = [[[30.0, 10.0, 20.0, 10.0]], []]
    sheet = detection_sheet(images, detections, ID2LABEL, ground_truth=truth, min_side=128)
    tiles_height = 384
    assert sheet.width == 256 + TILE_GAP + 128 and sheet.height == tiles_height + LEGEND_ROW_HEIGHT
    pixels = np.asarray(sheet)
    assert _share(pixels, label_colour(1), slice(16, 49), 16) == 1.0  # [4, 4, 20, 12] x 4: left side at x=16
    assert _share(pixels, label_colour(1), 48, slice(16, 81)) == 1.0  # bottom at y=48
    assert _share(pixels, GROUND_TRUTH_COLOUR, slice(40, 81), 120) == 1.0  # [30, 10, 20, 10] x 4
    assert np.all(pixels[:tiles_height, 256:256 + TILE_GAP] == 255)  # the white gap between the images
    assert np.all(pixels[:384, 256 + TILE_GAP:] == GREY)  # nothing drawn on the second image
    legend = pixels[tiles_height:]
    for colour in (GROUND_TRUTH_COLOUR, label_colour(1)):  # a swatch per colour drawn, none for other labels
        assert np.all(legend == colour, axis=-1).any(), colour
    assert not np.all(legend == label_colour(0), axis=-1).any()


def test_sheet_legend_wraps_and_bad_lists_are_refused() -> None:
    many = {"boxes": [[2 * i, 2, 2 * i + 10, 20] for i in range(12)], "scores": [0.5] * 12, "labels": list(range(12))}
    names = {i: f"class_{i}" for i in range(12)}
    sheet = detection_sheet([_grey(64, 64)], [many], names, min_side=64)
    assert sheet.width == 64 and sheet.height > 64 + 3 * LEGEND_ROW_HEIGHT  # every label named, in rows
    legend = np.asarray(sheet)[64:]
    assert all(np.all(legend == label_colour(i), axis=-1).any() for i in range(12))
    with pytest.raises(ValueError, match="2 images but 1 detections"):
        detection_sheet([_grey(8, 8)] * 2, [many], names)
    with pytest.raises(ValueError, match="at least one image; got none"):
        detection_sheet([], [], names)
