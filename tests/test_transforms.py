"""DETR augmentation (boxes follow pixels, dropping, determinism) and the collator."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from modeling_detr_custom.data import DetrCollator, coco_objects_to_target, target_to_coco_annotation
from modeling_detr_custom.data.transforms import (
    DEFAULT_SCALES,
    RandomChannelShuffle,
    RandomHorizontalFlip,
    RandomSizeCrop,
    RandomVerticalFlip,
    crop,
    hflip,
    make_eval_transforms,
    make_flip_colour_transforms,
    make_train_transforms,
    resize,
    scaled_train_transform_kwargs,
    vflip,
)
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.image_processing_detr_custom import get_size_with_aspect_ratio as processor_size

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _scene(h: int = 90, w: int = 120) -> tuple[torch.Tensor, dict]:
    """Black uint8 (3, h, w) image with a red and a green filled rectangle; target in xyxy pixels."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [70.0, 5.0, 110.0, 35.0]])  # x0, y0, x1, y1 (x1/y1 exclusive)
    for (x0, y0, x1, y1), colour in zip(boxes.int().tolist(), (RED, GREEN)):
        image[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    target = {"boxes": boxes, "class_labels": torch.tensor([1, 2]), "area": torch.tensor([1600.0, 1200.0]),
              "iscrowd": torch.tensor([0, 0]), "note": "passed through"}
    return image, target


def _colour_box(image: torch.Tensor, colour: tuple[int, int, int]) -> list[float] | None:
    """xyxy (x1, y1 exclusive) bounds of pixels at least half ``colour`` (on a black background,
    so a pixel more than half covered by the shape after interpolation)."""
    dist = (image.float() - torch.tensor(colour, dtype=torch.float32)[:, None, None]).abs().sum(0)
    ys, xs = torch.nonzero(dist < 127.5, as_tuple=True)
    if len(xs) == 0:
        return None
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def _assert_boxes_follow_pixels(image: torch.Tensor, target: dict, tol: float = 1.5) -> None:
    labels = target["class_labels"].tolist()
    for label, colour in ((1, RED), (2, GREEN)):
        seen = _colour_box(image, colour)
        if label not in labels:
            assert seen is None or (seen[2] - seen[0]) * (seen[3] - seen[1]) <= 2, "dropped box still has pixels"
            continue
        box = target["boxes"][labels.index(label)].tolist()
        assert seen is not None and max(abs(a - b) for a, b in zip(box, seen)) <= tol, (box, seen)


def test_hflip_boxes_follow_pixels() -> None:
    image, target = hflip(*_scene())
    assert target["boxes"][0].tolist() == [70.0, 20.0, 110.0, 60.0]
    _assert_boxes_follow_pixels(image, target, tol=0)
    assert target["note"] == "passed through"


@pytest.mark.parametrize("size,max_size", [(45, None), (200, None), (100, 110), (64, 1333)])
def test_resize_boxes_follow_pixels(size: int, max_size: int | None) -> None:
    image, target = resize(*_scene(), size=size, max_size=max_size)
    h, w = image.shape[-2:]
    assert min(h, w) == size or max(h, w) <= max_size
    _assert_boxes_follow_pixels(image, target)
    ratio = (w / 120) * (h / 90)
    assert torch.allclose(target["area"], torch.tensor([1600.0, 1200.0]) * ratio)


def test_crop_boxes_follow_pixels_and_empty_boxes_dropped() -> None:
    image, target = crop(*_scene(), top=30, left=0, height=60, width=60)  # cuts red, misses green
    assert image.shape == (3, 60, 60)
    assert target["boxes"].tolist() == [[10.0, 0.0, 50.0, 30.0]]
    assert target["class_labels"].tolist() == [1] and target["iscrowd"].tolist() == [0]
    assert target["area"].tolist() == [40.0 * 30.0], "area becomes the clipped box area, as in the original"
    _assert_boxes_follow_pixels(image, target, tol=0)
    image, target = crop(*_scene(), top=70, left=60, height=20, width=60)  # contains no box
    assert all(len(v) == 0 for k, v in target.items() if k != "note")


def test_vflip_boxes_follow_pixels_and_twice_is_the_identity() -> None:
    scene = _scene()
    image, target = vflip(*scene)
    assert target["boxes"].tolist() == [[10.0, 30.0, 50.0, 70.0], [70.0, 55.0, 110.0, 85.0]]
    _assert_boxes_follow_pixels(image, target, tol=0)
    again, back = vflip(image, target)
    assert torch.equal(again, scene[0]) and torch.equal(back["boxes"], scene[1]["boxes"])


def test_channel_shuffle_permutes_colours_and_leaves_boxes() -> None:
    image, target = _scene()
    seen = set()
    for seed in range(30):
        out, out_target = RandomChannelShuffle(1.0)(image, target, torch.Generator().manual_seed(seed))
        assert out_target is target or torch.equal(out_target["boxes"], target["boxes"])
        red = out[:, 30, 30].tolist()  # a pixel of the red box: one channel 255, the others 0
        assert sorted(red) == [0, 0, 255]
        seen.add(tuple(red))
    assert len(seen) == 3, "red lands in each channel over the draws"
    assert RandomChannelShuffle(0.0)(image, target, torch.Generator().manual_seed(0))[0] is image


def test_flip_colour_transforms_keep_only_the_ones_asked_for() -> None:
    assert make_flip_colour_transforms() == []
    chosen = make_flip_colour_transforms(fliplr=0.5, flipud=0.25, channel_shuffle=1.0)
    assert [type(t) for t in chosen] == [RandomHorizontalFlip, RandomVerticalFlip, RandomChannelShuffle]
    assert [t.p for t in chosen] == [0.5, 0.25, 1.0]
    assert [type(t) for t in make_flip_colour_transforms(flipud=0.5)] == [RandomVerticalFlip]
    detr = make_train_transforms(fliplr=0.0, flipud=0.5).transforms
    assert [type(t).__name__ for t in detr] == ["RandomVerticalFlip", "RandomSelect"]
    default = make_train_transforms().transforms
    assert [type(t).__name__ for t in default] == ["RandomHorizontalFlip", "RandomSelect"] and default[0].p == 0.5


def test_vertical_flips_happen_at_their_rate_and_boxes_follow() -> None:
    flips = 0
    for seed in range(200):
        image, target = RandomVerticalFlip(0.25)(*_scene(), torch.Generator().manual_seed(seed))
        _assert_boxes_follow_pixels(image, target, tol=0)
        flips += target["boxes"][0, 1].item() != 20.0
    assert 30 <= flips <= 70, flips


def test_train_transforms_boxes_follow_pixels_over_many_draws() -> None:
    t = make_train_transforms(scales=(48, 64, 80), max_size=120, crop_resize_scales=(60, 70), crop_min=30, crop_max=60)
    outcomes = set()
    for seed in range(40):
        image, target = t(*_scene(), torch.Generator().manual_seed(seed))
        _assert_boxes_follow_pixels(image, target)
        short, long = sorted(image.shape[-2:])
        assert long <= 120 and (short in (48, 64, 80) or long >= 116), "short side a scale unless the long side limits"
        outcomes.add(len(target["class_labels"]))
    assert outcomes >= {1, 2}, "the crop branch must sometimes drop a box"


def test_transforms_deterministic_under_seeded_generator() -> None:
    t = make_train_transforms(**scaled_train_transform_kwargs(90))
    runs = [t(*_scene(), torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    others = [t(*_scene(), torch.Generator().manual_seed(s)) for s in range(8, 14)]
    assert any(o[0].shape != runs[0][0].shape or not torch.equal(o[0], runs[0][0]) for o in others)


def test_random_size_crop_limits() -> None:
    c = RandomSizeCrop(30, 50)
    for seed in range(20):
        image, _ = c(*_scene(), torch.Generator().manual_seed(seed))
        assert 30 <= image.shape[1] <= 50 and 30 <= image.shape[2] <= 50
    small, _ = RandomSizeCrop(384, 600)(*_scene(), torch.Generator().manual_seed(0))
    assert small.shape[1:] == (90, 120), "min size lowered to the image side for small images"


def test_resize_uses_the_processors_size_rule() -> None:
    """Training and evaluation share one size rule: the processor's (transformers' arithmetic).

    Where the long-side limit binds it can differ from facebookresearch/detr's by one pixel on the long side:
    (500, 3000) -> (222, 1333) here, (222, 1332) there; (100, 1000) -> (133, 1333), not (133, 1330).
    """
    expected = {(480, 640): (800, 1066), (640, 480): (1066, 800), (500, 3000): (222, 1333), (100, 1000): (133, 1333),
                (800, 1000): (800, 1000)}
    assert {hw: processor_size(hw, 800, 1333) for hw in expected} == expected
    for h, w in [(48, 64), (64, 48), (50, 300), (10, 100), (97, 203), (40, 40)]:
        for size, max_size in [(80, 133), (32, 1333), (45, None)]:
            image, _ = resize(torch.zeros(3, h, w, dtype=torch.uint8), {}, size, max_size)
            assert tuple(image.shape[-2:]) == processor_size((h, w), size, max_size), (h, w, size, max_size)


def test_default_and_scaled_settings() -> None:
    assert DEFAULT_SCALES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    kw = scaled_train_transform_kwargs(128)
    assert kw["scales"][-1] == 128 and kw["max_size"] == 213 and kw["crop_resize_scales"] == (64, 80, 96)
    image, target = _scene()
    out_image, out_target = make_eval_transforms()(image, target)
    assert out_image is image and out_target is target


# ----------------------------------------------------------------------------- row -> target -> processor


def test_row_target_and_processor_annotation_share_one_box_rule() -> None:
    """Crowd and empty boxes dropped, the rest clipped to the image; class id ``category`` -> ``class_labels``
    -> the processor's ``category_id``; boxes xywh -> xyxy -> xywh unchanged when not clipped."""
    objects = {"bbox": [[8.0, 4.0, 40.0, 20.0], [0.0, 0.0, 10.0, 10.0], [70.0, 30.0, 20.0, 20.0], [5.0, 5.0, 0.0, 3.0]],
               "category": [3, 1, 7, 2], "iscrowd": [0, 1, 0, 0]}
    target = coco_objects_to_target(objects, height=40, width=80)
    assert target["boxes"].tolist() == [[8.0, 4.0, 48.0, 24.0], [70.0, 30.0, 80.0, 40.0]]
    assert target["class_labels"].tolist() == [3, 7] and target["area"].tolist() == [800.0, 100.0]
    annotation = target_to_coco_annotation(9, target)
    assert [a["bbox"] for a in annotation["annotations"]] == [[8.0, 4.0, 40.0, 20.0], [70.0, 30.0, 10.0, 10.0]]
    assert [a["category_id"] for a in annotation["annotations"]] == [3, 7] and annotation["image_id"] == 9


# ----------------------------------------------------------------------------- collator


def _row(image_id: int, w: int, h: int, objects: list[tuple[list[float], int, int]]) -> dict:
    """Dataset row: PIL image + objects with COCO xywh boxes (bbox, category, iscrowd)."""
    return {"image_id": image_id, "image": Image.new("RGB", (w, h), (90, 90, 90)), "width": w, "height": h,
            "objects": {"id": list(range(len(objects))), "area": [b[2] * b[3] for b, _, _ in objects],
                        "bbox": [b for b, _, _ in objects], "category": [c for _, c, _ in objects],
                        "iscrowd": [z for _, _, z in objects]}}


def _rows() -> list[dict]:
    return [
        _row(1, 80, 40, [([8.0, 4.0, 40.0, 20.0], 3, 0), ([0.0, 0.0, 10.0, 10.0], 1, 1)]),  # second is crowd
        _row(2, 30, 60, [([3.0, 6.0, 12.0, 30.0], 7, 0), ([29.0, 0.0, 5.0, 5.0], 1, 0)]),  # second clipped to 1 px
        _row(3, 50, 50, []),  # negative image
    ]


def test_eval_collate_shapes_mask_and_normalised_boxes() -> None:
    proc = DetrCustomImageProcessor(size={"shortest_edge": 40, "longest_edge": 200})
    batch = DetrCollator(proc)(_rows())
    sizes = [(40, 80), (80, 40), (40, 40)]  # resized (h, w): short side 40
    assert batch["pixel_values"].shape == (3, 3, 80, 80) and batch["pixel_mask"].shape == (3, 80, 80)
    for mask, (h, w), labels in zip(batch["pixel_mask"], sizes, batch["labels"]):
        assert mask.sum() == h * w and mask[:h, :w].all()
        assert labels["size"].tolist() == [h, w]
    first, second, third = batch["labels"]
    assert first["class_labels"].tolist() == [3], "crowd dropped"
    assert torch.allclose(first["boxes"], torch.tensor([[28 / 80, 14 / 40, 40 / 80, 20 / 40]]))
    assert first["orig_size"].tolist() == [40, 80] and first["image_id"].tolist() == [1]
    assert second["class_labels"].tolist() == [7, 1]
    assert torch.allclose(second["boxes"], torch.tensor([[9 / 30, 21 / 60, 12 / 30, 30 / 60],
                                                         [29.5 / 30, 2.5 / 60, 1 / 30, 5 / 60]]))
    assert third["boxes"].shape == (0, 4) and third["class_labels"].shape == (0,)


def test_train_collate_normalises_by_unpadded_size() -> None:
    proc = DetrCustomImageProcessor()
    t = make_train_transforms(**scaled_train_transform_kwargs(60))
    batch = DetrCollator(proc, t, seed=0)(_rows())
    assert batch["pixel_values"].dtype == torch.float32
    for mask, labels in zip(batch["pixel_mask"], batch["labels"]):
        h, w = labels["size"].tolist()
        assert mask.sum() == h * w and mask[:h, :w].all(), "mask marks exactly the unpadded image"
        assert labels["boxes"].numel() == 0 or (labels["boxes"].min() >= 0 and labels["boxes"].max() <= 1)
    again = DetrCollator(proc, t, seed=0)(_rows())
    assert torch.equal(batch["pixel_values"], again["pixel_values"]), "deterministic for a seed"


def test_train_collate_boxes_follow_pixels_through_processor() -> None:
    """A red box through augmentation + processor: normalised cxcywh x unpadded size bounds the red pixels."""
    proc = DetrCustomImageProcessor(do_normalize=False, do_rescale=False)
    t = make_train_transforms(scales=(48, 64), max_size=100, crop_resize_scales=(60,), crop_min=40, crop_max=60)
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    image.paste(RED, (20, 10, 50, 40))  # pixels x 20..49, y 10..39 -> COCO [20, 10, 30, 30]
    row = {"image_id": 5, "image": image,
           "objects": {"bbox": [[20.0, 10.0, 30.0, 30.0]], "category": [1], "area": [900.0]}}
    for seed in range(10):
        batch = DetrCollator(proc, t, seed=seed)([row])
        labels = batch["labels"][0]
        if len(labels["boxes"]) == 0:
            continue
        h, w = labels["size"].tolist()
        cx, cy, bw, bh = (labels["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        seen = _colour_box(batch["pixel_values"][0, :, :h, :w], RED)
        assert max(abs(a - b) for a, b in zip([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], seen)) <= 1.5


def test_collate_accepts_objects_as_list_of_dicts() -> None:
    """Some Hub datasets store objects as List({...}) (a list of dicts per row) instead of a dict of lists."""
    proc = DetrCustomImageProcessor(size={"shortest_edge": 40, "longest_edge": 200})
    as_columns = _rows()[:2]
    as_rows = [{**r, "objects": [dict(zip(r["objects"], vals)) for vals in zip(*r["objects"].values())]}
               for r in as_columns]
    a, b = DetrCollator(proc)(as_columns), DetrCollator(proc)(as_rows)
    for la, lb in zip(a["labels"], b["labels"]):
        assert torch.equal(la["boxes"], lb["boxes"]) and torch.equal(la["class_labels"], lb["class_labels"])
    empty = DetrCollator(proc)([{**_rows()[2], "objects": []}])
    assert empty["labels"][0]["boxes"].shape == (0, 4)
