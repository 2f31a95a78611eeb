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
from PIL import Image

from conftest import ROOT, tiny_config
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.predict import draw_detections, label_colour, line_width
from modeling_detr_custom.synthetic import generate_image

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


def test_draw_detections_outlines_each_box_in_its_label_colour_with_a_filled_tag() -> None:
    image = Image.new("RGB", (200, 150), (128, 128, 128))
    detections = [
        {"label": "circle", "label_id": 0, "score": 0.9, "box": {"xmin": 20, "ymin": 40, "xmax": 90, "ymax": 120}},
        {"label": "square", "label_id": 1, "score": 0.8, "box": {"xmin": 110, "ymin": 5, "xmax": 190, "ymax": 60}}]
    pixels = np.asarray(draw_detections(image, detections))
    width = line_width(image.size)
    for det in detections:
        colour = label_colour(det["label_id"])
        x0, y0, x1, y1 = (det["box"][k] for k in ("xmin", "ymin", "xmax", "ymax"))
        for offset in range(width):  # the outline is `width` px thick, inside the box
            assert _edge_fraction(pixels, colour, x0 + offset, slice(y0, y1 + 1)) == 1.0
            assert _edge_fraction(pixels, colour, x1 - offset, slice(y0, y1 + 1)) == 1.0
            assert _edge_fraction(pixels, colour, slice(x0, x1 + 1), y1 - offset) == 1.0
        inside = pixels[y0 + 30:y1 - width, x0 + width:x1 - width + 1]  # below where a tag can be
        assert np.all(inside == 128)
    # the first box's tag sits just above it: a filled block of its colour with text in black or white
    tag = pixels[40 - 12:40, 20:60]
    share = np.all(tag == label_colour(0), axis=-1).mean()
    text = ((tag.min(axis=-1) > 200) | (tag.max(axis=-1) < 60)).mean()  # anti-aliased white or black strokes
    assert share > 0.4 and text > 0.02, (share, text)
    # the second box touches the top edge: its tag goes inside the box instead of off the image
    assert np.all(pixels[5:18, 110:150] == label_colour(1), axis=-1).mean() > 0.4
    colours = {label_colour(i) for i in range(12)}
    assert len(colours) == 12  # a distinct colour per label


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
