"""scripts/predict.py (issue 5): JSON of detections + one drawn PNG per image, batched, bad inputs skipped.

The fast tests use a random tiny model with threshold 0 (so every query yields a box); the slow test trains a
tiny DETR on synthetic shapes and checks it finds the shapes of an image it never saw.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image

from modeling_detr_custom.data.synthetic import generate_image
from modeling_detr_custom.drawing import label_colour
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection

_spec = importlib.util.spec_from_file_location("script_predict", ROOT / "scripts" / "predict.py")
PREDICT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PREDICT)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """Random weights, 2 queries: threshold 0 gives exactly 2 boxes per image."""
    folder = tmp_path_factory.mktemp("random_model")
    torch.manual_seed(0)
    DetrCustomForObjectDetection(tiny_config(num_queries=2)).save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Three synthetic images, two of the same size."""
    folder = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate([(96, 128), (128, 80), (96, 128)]):
        image, _ = generate_image(np.random.default_rng(i), 128, 1, 2, (0, 1, 2))
        image.resize((w, h)).save(folder / f"img{i}.png")
    return folder


def _edge_fraction(pixels: np.ndarray, colour: tuple[int, int, int], xs: slice | int, ys: slice | int) -> float:
    """Share of the pixels at [ys, xs] that have exactly ``colour``."""
    return float(np.all(pixels[ys, xs] == colour, axis=-1).mean())


def _box_edges_drawn(png: Path, det: dict, tag_rows: int = 0) -> dict[str, float]:
    """Share of each box side (inner pixel row/column of the outline) in the label's colour. The top
    ``tag_rows`` rows of the sides are left out: the label tag may sit there."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    colour = label_colour(det["label_id"])
    x0, y0, x1, y1 = (round(det["box"][k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    x1, y1 = min(x1, pixels.shape[1] - 1), min(y1, pixels.shape[0] - 1)
    return {"left": _edge_fraction(pixels, colour, x0, slice(y0 + tag_rows, y1 + 1)),
            "right": _edge_fraction(pixels, colour, x1, slice(y0 + tag_rows, y1 + 1)),
            "bottom": _edge_fraction(pixels, colour, slice(x0, x1 + 1), y1)}


def test_writes_one_json_and_a_png_per_image_and_skips_what_is_not_an_image(
        random_model: Path, image_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    code = PREDICT.main(["--model", str(random_model), str(image_dir), str(tmp_path / "notes.txt"),
                         str(tmp_path / "broken.png"), str(tmp_path / "missing.jpg"), "--threshold", "0",
                         "--batch_size", "2", "--output_dir", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "detections.json").read_text())
    assert [Path(i["path"]).name for i in report["images"]] == ["img0.png", "img1.png", "img2.png"]
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"notes.txt", "broken.png", "missing.jpg"}
    assert "not a readable image" in skipped["broken.png"] and "no such file" in skipped["missing.jpg"]
    for name in skipped:
        assert f"skipped {tmp_path / name}" in captured.err
    for entry in report["images"]:
        assert len(entry["detections"]) == 2  # threshold 0: every query
        drawn = Image.open(out / entry["output_image"])
        assert drawn.size == (entry["width"], entry["height"]) == Image.open(entry["path"]).size
        best = max(entry["detections"], key=lambda d: d["score"])  # drawn last, so on top
        edges = _box_edges_drawn(out / entry["output_image"], best, tag_rows=20)
        assert min(edges.values()) >= 0.9, (entry, edges)


def test_batches_give_the_pipelines_detections(random_model: Path, image_dir: Path, tmp_path: Path) -> None:
    """Batched or not, the detections are what pipeline("object-detection") returns image by image.

    Only same-size images share a batch (img0 and img2 here): DETR's backbone sees the zero padding beyond
    an image's border, so padding would move the scores of small images by several hundredths.
    """
    from transformers import pipeline

    from modeling_detr_custom.predict import same_size_batches

    assert same_size_batches([(128, 96), (80, 128), (128, 96), (128, 96)], 2) == [[0, 2], [3], [1]]
    reports = {}
    for batch_size in (1, 3):
        out = tmp_path / f"b{batch_size}"
        assert PREDICT.main(["--model", str(random_model), str(image_dir), "--threshold", "0", "--output_dir", str(out),
                             "--batch_size", str(batch_size)]) == 0
        reports[batch_size] = json.loads((out / "detections.json").read_text())["images"]
    for one, three in zip(reports[1], reports[3]):
        assert one["path"] == three["path"]  # the inputs' order, whatever the batching
        for a, b in zip(one["detections"], three["detections"]):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-4
            assert max(abs(a["box"][k] - b["box"][k]) for k in a["box"]) < 0.05
    detector = pipeline("object-detection", model=str(random_model), trust_remote_code=True)
    for entry in reports[3]:
        expected = detector(Image.open(entry["path"]).convert("RGB"), threshold=0.0)
        assert [d["label"] for d in expected] == [d["label"] for d in entry["detections"]]
        for want, got in zip(expected, entry["detections"]):
            assert abs(want["score"] - got["score"]) < 1e-4
            assert max(abs(want["box"][k] - got["box"][k]) for k in want["box"]) <= 1  # the pipeline truncates to int


def test_missing_model_folder_is_a_clear_error(image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "no_such_model"
    assert PREDICT.main(["--model", str(missing), str(image_dir), "--output_dir", str(out)]) == 1
    assert f"model folder not found: {missing}" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a run that cannot start
    (tmp_path / "empty").mkdir()
    assert PREDICT.main(["--model", str(tmp_path / "empty"), str(image_dir), "--output_dir", str(out)]) == 1
    assert "is not a saved model folder (no config.json in it)" in capsys.readouterr().err


def test_no_readable_image_at_all_fails(random_model: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("text")
    text_only = ["--model", str(random_model), str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "o")]
    assert PREDICT.main(text_only) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "none of the 1 input(s) is a readable image" in err
    with pytest.raises(SystemExit):
        PREDICT.main(["--model", str(random_model), str(tmp_path / "a.txt"), "--threshold", "1.5"])


# ----------------------------------------------------------------------------- a model that learned (slow)

# DETR from scratch generalises to new layouts within a CPU test only in the simplest setting: one shape
# class, one shape per image, 64 px, a fresh batch of images every step (no image is seen twice, so it
# cannot memorise). With the reference doc's fast recipe (test_resnet, d_model 256, 2+2 layers, 8 queries,
# lr 2e-4, no dropout, no augmentation) it finds >= 90% of the circles of unseen images after ~700 steps;
# more classes or shapes per image need thousands of steps (measured: 2 classes, 0.3 recall at 1200).
# 1,000 steps were enough on an AVX-512 CPU but not on an AVX2-only one, where float rounding gives another run:
# its top-scoring detection was a small box inside the circle, ahead of the right one. 1,500 steps pass there.
TRAIN_STEPS, LR_DROP_FRACTION, TRAIN_BATCH, IMAGE_SIZE, TRAIN_SEED = 1500, 0.8, 8, 64, 0
UPSCALE = 2  # test images are shown 2x larger: boxes must come back in the input image's pixels


def _circle_image(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """A 64 px synthetic image with one circle, and its COCO annotations (bbox xywh, absolute pixels)."""
    image, specs = generate_image(rng, IMAGE_SIZE, 1, 1, category_ids=(0,))
    return image, [{"bbox": list(s.bbox), "category_id": s.category_id, "area": float(s.area), "iscrowd": 0}
                   for s in specs]


def train_circle_detector(folder: Path, steps: int = TRAIN_STEPS, seed: int = TRAIN_SEED) -> Path:
    """Train a tiny DETR on fresh synthetic circles and save it (model + processor) to ``folder``."""
    torch.manual_seed(seed)
    config = tiny_config(d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
                         decoder_attention_heads=8, encoder_ffn_dim=512, decoder_ffn_dim=512, num_queries=8,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, freeze_backbone_stem=False,
                         id2label={0: "circle"})
    model = DetrCustomForObjectDetection(config)
    processor = DetrCustomImageProcessor(size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices are too small to share: a second thread only adds contention
    try:
        model.train()
        for step in range(steps):
            if step == round(steps * LR_DROP_FRACTION):  # DETR's lr x0.1 near the end settles the boxes
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
            examples = [_circle_image(np.random.default_rng([seed, step, i])) for i in range(TRAIN_BATCH)]
            batch = processor([image for image, _ in examples],
                              annotations=[{"image_id": i, "annotations": a} for i, (_, a) in enumerate(examples)])
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A tiny DETR that learned to find circles (about 2-3 minutes on 2 cores)."""
    return train_circle_detector(tmp_path_factory.mktemp("trained_model"))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two absolute xyxy boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.slow
def test_trained_model_finds_the_shapes_of_new_images_and_draws_them(trained_model: Path, tmp_path: Path) -> None:
    images_dir, out = tmp_path / "new", tmp_path / "out"
    images_dir.mkdir()
    truth = {}
    rng_index = 0
    while len(truth) < 2:  # two unseen images whose circle is at least 16 px (the smallest are 10 px)
        image, annotations = _circle_image(np.random.default_rng([TRAIN_SEED + 1, rng_index]))
        rng_index += 1
        x, y, w, h = annotations[0]["bbox"]
        if min(w, h) >= 16:
            name = f"new{len(truth)}.png"
            image.resize((IMAGE_SIZE * UPSCALE,) * 2, Image.NEAREST).save(images_dir / name)
            truth[name] = tuple(UPSCALE * v for v in (x, y, x + w, y + h))  # xyxy in the saved image's pixels
    assert PREDICT.main(["--model", str(trained_model), str(images_dir), "--output_dir", str(out)]) == 0
    report = json.loads((out / "detections.json").read_text())
    assert report["threshold"] == 0.5 and len(report["images"]) == 2
    for entry in report["images"]:
        gt = truth[Path(entry["path"]).name]
        boxes = {tuple(d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")): d for d in entry["detections"]}
        matches = [d for box, d in boxes.items() if d["label"] == "circle" and _iou(box, gt) >= 0.5]
        assert matches, f"no circle found at {gt} in {entry['path']}: {entry['detections']}"
        best = max(entry["detections"], key=lambda d: d["score"])
        assert best in matches, entry["detections"]  # DETR has no NMS: near-duplicates may follow, not lead
        edges = _box_edges_drawn(out / entry["output_image"], best, tag_rows=20)
        assert min(edges.values()) >= 0.9, (entry, edges)
