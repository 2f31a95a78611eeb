"""Pictures of detections: one image with its boxes drawn (`draw_detections`, what `predict.py` writes per
image) and the sheet of several images side by side with a legend (`detection_sheet`, a training run's
``detections.png``).

Not remote code: nothing in the model, config or processor files imports this module.

Formats, per image:

* ``detections``: {"boxes": (n, 4) absolute (x0, y0, x1, y1) pixels of the image, "scores": (n,),
  "labels": (n,) model label ids}, as ``post_process_object_detection`` returns them (tensors, arrays or lists);
  without "scores" (a dataset's own boxes: ``data.pictures``) a tag holds the label alone;
* ``ground_truth``: (m, 4) absolute COCO (x, y, w, h) pixels of the image.

A prediction is outlined in its label's colour (`label_colour`) with a filled "label score" tag above it;
ground truth is a thin green outline under the predictions.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
from PIL import ImageDraw, ImageFont

GROUND_TRUTH_COLOUR = (0, 200, 0)
TILE_GAP = 4  # white pixels between the images of a sheet
LEGEND_ROW_HEIGHT = 18  # pixels per row of the legend under a sheet
LEGEND_FONT_SIZE = 11


# ----------------------------------------------------------------------------- style


def label_colour(label_id: int) -> tuple[int, int, int]:
    """A saturated colour per label id; golden-ratio hue steps keep consecutive ids far apart."""
    hue = (label_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light, white on dark backgrounds (relative luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def line_width(image_size: tuple[int, int]) -> int:
    """Box outline width: 2 px for small images, growing with the image so boxes stay visible."""
    return max(2, round(min(image_size) / 160))


def _label_name(id2label: Mapping[int, str], label: int) -> str:
    return id2label.get(int(label), str(int(label)))


def _tolist(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


# ----------------------------------------------------------------------------- one image


def draw_detections(image: PIL.Image.Image, detections: Mapping[str, Any], id2label: Mapping[int, str],
                    ground_truth: Sequence[Sequence[float]] | None = None) -> PIL.Image.Image:
    """A copy of ``image`` (RGB) with each prediction's box outlined in its label's colour and "label score"
    written on a filled tag of that colour above the box (inside it at the top edge), over the optional
    ground-truth boxes. Formats: the module docstring."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for x, y, w, h in (ground_truth if ground_truth is not None else []):
        draw.rectangle([round(x), round(y), round(x + w), round(y + h)], outline=GROUND_TRUTH_COLOUR, width=1)
    labels = _tolist(detections["labels"])
    scores = _tolist(detections["scores"]) if detections.get("scores") is not None else [None] * len(labels)
    found = zip(_tolist(detections["boxes"]), scores, labels)
    ordered = sorted(found, key=lambda item: item[1] or 0.0)  # the best box is drawn last, on top
    boxes = [[round(v) for v in box] for box, _, _ in ordered]
    width = line_width(canvas.size)
    for (_, _, label), box in zip(ordered, boxes):
        draw.rectangle(box, outline=label_colour(int(label)), width=width)
    font = _font(max(11, round(min(canvas.size) / 30)))
    for (_, score, label), box in zip(ordered, boxes):  # tags after all boxes, so no outline crosses a text
        text = _label_name(id2label, label) + ("" if score is None else f" {score:.2f}")
        _draw_tag(draw, canvas.size, box, text, label_colour(int(label)), font)
    return canvas


def _draw_tag(draw: ImageDraw.ImageDraw, size: tuple[int, int], box: list[int], text: str,
              colour: tuple[int, int, int], font: ImageFont.ImageFont) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(box[0], 0), max(size[0] - tag_w, 0))
    y = box[1] - tag_h if box[1] - tag_h >= 0 else box[1]  # above the box when it fits
    draw.rectangle([x, y, x + tag_w - 1, y + tag_h - 1], fill=colour)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(colour), font=font)


# ----------------------------------------------------------------------------- a sheet of images


def detection_sheet(images: Sequence[PIL.Image.Image], detections: Sequence[Mapping[str, Any]],
                    id2label: Mapping[int, str], ground_truth: Sequence[Sequence[Sequence[float]]] | None = None,
                    min_side: int = 256) -> PIL.Image.Image:
    """The images side by side, each upscaled (nearest neighbour) until its short side is ``min_side`` px,
    with their predictions (`draw_detections`), optional ground truth and a legend under them.

    ``detections[i]`` and ``ground_truth[i]`` are in the pixels of ``images[i]`` (formats: the module docstring).
    Raises ValueError when there is no image or the lists differ in length.
    """
    if not images:
        raise ValueError("detection_sheet needs at least one image; got none")
    if len(detections) != len(images) or (ground_truth is not None and len(ground_truth) != len(images)):
        raise ValueError(f"{len(images)} images but {len(detections)} detections and "
                         f"{'no' if ground_truth is None else len(ground_truth)} ground truth lists")
    truths = ground_truth if ground_truth is not None else [None] * len(images)
    tiles = [_tile(image, det, id2label, truth, min_side) for image, det, truth in zip(images, detections, truths)]
    width = sum(t.width for t in tiles) + TILE_GAP * (len(tiles) - 1)
    legend = _legend_rows(_legend_items(detections, id2label, bool(ground_truth)), width)
    height = max(t.height for t in tiles)
    canvas = PIL.Image.new("RGB", (width, height + LEGEND_ROW_HEIGHT * len(legend)), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + TILE_GAP
    _draw_legend(ImageDraw.Draw(canvas), legend, height)
    return canvas


def _tile(image: PIL.Image.Image, detections: Mapping[str, Any], id2label: Mapping[int, str],
          ground_truth: Sequence[Sequence[float]] | None, min_side: int) -> PIL.Image.Image:
    """One image of a sheet: upscaled to ``min_side``, its boxes scaled with it, then drawn."""
    scale = max(1.0, min_side / min(image.size))
    tile = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                       PIL.Image.NEAREST)  # nearest: the pixels stay visible as the model saw them
    scaled = {"boxes": [[v * scale for v in box] for box in _tolist(detections["boxes"])],
              "scores": detections.get("scores"), "labels": detections["labels"]}
    truth = None if ground_truth is None else [[v * scale for v in box] for box in ground_truth]
    return draw_detections(tile, scaled, id2label, truth)


# A legend item: (swatch colour and outline width, or None for plain text; text).
_LegendItem = tuple[tuple[tuple[int, int, int], int] | None, str]


def _legend_items(detections: Sequence[Mapping[str, Any]], id2label: Mapping[int, str],
                  with_truth: bool) -> list[_LegendItem]:
    """Ground truth (if shown), then each predicted label's colour and name."""
    labels = sorted({int(label) for det in detections for label in _tolist(det["labels"])})
    items: list[_LegendItem] = [((GROUND_TRUTH_COLOUR, 1), "ground truth")] if with_truth else []
    scored = any(det.get("scores") is not None for det in detections)
    title = "predictions (label score):" if scored else "boxes (label):"
    items.append((None, title + ("" if labels else " none")))
    return items + [((label_colour(label), 2), _label_name(id2label, label)) for label in labels]


def _legend_rows(items: list[_LegendItem], width: int) -> list[list[tuple[int, _LegendItem]]]:
    """The items with their x positions, wrapped into rows no wider than ``width`` (at least one per row)."""
    measure = ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    font = _font(LEGEND_FONT_SIZE)
    rows: list[list[tuple[int, _LegendItem]]] = [[]]
    x = 4
    for item in items:
        item_width = (20 if item[0] else 0) + round(measure.textlength(item[1], font=font))
        if rows[-1] and x + item_width > width:
            rows.append([])
            x = 4
        rows[-1].append((x, item))
        x += item_width + 12
    return rows


def _draw_legend(draw: ImageDraw.ImageDraw, rows: list[list[tuple[int, _LegendItem]]], top: int) -> None:
    """The legend rows under the tiles, from ``top`` down."""
    font = _font(LEGEND_FONT_SIZE)
    for row, items in enumerate(rows):
        y = top + row * LEGEND_ROW_HEIGHT + 4
        for x, (swatch, text) in items:
            if swatch:
                draw.rectangle([x, y, x + 14, y + 10], outline=swatch[0], width=swatch[1])
                x += 20
            draw.text((x, y), text, fill=(0, 0, 0), font=font)


__all__ = ["GROUND_TRUTH_COLOUR", "label_colour", "line_width", "draw_detections", "detection_sheet"]
