"""YOLO (ultralytics layout) folders as a data source: the COCO loader's rows, bad label lines, training on one."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_training import TRAIN, fresh_accelerate_state, tiny_run_args  # noqa: F401 (an autouse fixture)

from modeling_detr_custom.data import (
    YOLO_REPORT_KEYS,
    load_coco_folder_with_info,
    load_yolo_folder,
    load_yolo_folder_with_info,
    make_synthetic_coco,
)

REPO = Path(__file__).resolve().parents[1]
SHAPES = dict(num_train=6, num_val=2, image_size=48, seed=2)


@pytest.fixture()
def yolo_dir(tmp_path: Path) -> Path:
    """6 train + 2 val synthetic images of 48 px, as a YOLO folder (classes circle, square, triangle)."""
    make_synthetic_coco(tmp_path / "yolo", format="yolo", **SHAPES)
    return tmp_path / "yolo"


def _load(folder: Path, tmp_path: Path, **kwargs):
    return load_yolo_folder_with_info(folder, cache_dir=str(tmp_path / "cache"), **kwargs)


def _label_file(folder: Path, stem: str) -> Path:
    return folder / "labels" / "train" / f"{stem}.txt"


def _append_line(folder: Path, stem: str, line: str) -> int:
    """Append ``line`` to a train label file; return its line number."""
    path = _label_file(folder, stem)
    lines = path.read_text().splitlines()
    path.write_text("".join(f"{x}\n" for x in lines + [line]))
    return len(lines) + 1


def _lines(folder: Path, stem: str) -> int:
    return len(_label_file(folder, stem).read_text().splitlines())


# ----------------------------------------------------------------------------- the same rows as COCO


def test_synthetic_as_coco_and_as_yolo_load_into_the_same_rows(tmp_path: Path) -> None:
    spec = dict(num_train=24, num_val=8, image_size=64, seed=5, category_ids=(1, 3, 7))  # COCO-like id gaps
    make_synthetic_coco(tmp_path / "coco", **spec)
    make_synthetic_coco(tmp_path / "yolo", format="yolo", **spec)
    coco = load_coco_folder_with_info(tmp_path / "coco", contiguous_labels=True, cache_dir=str(tmp_path / "c"))
    yolo = _load(tmp_path / "yolo", tmp_path)
    assert yolo.label_mapping.names == coco.label_mapping.names == ["circle", "square", "triangle"]
    assert yolo.label_mapping.id2label == {0: "circle", 1: "square", 2: "triangle"}
    assert set(yolo.dataset) == set(coco.dataset) == {"train", "val"}
    for split in ("train", "val"):
        c_rows, y_rows = list(coco.dataset[split]), list(yolo.dataset[split])
        assert yolo.dataset[split].features == coco.dataset[split].features, "exactly the same schema"
        assert len(y_rows) == len(c_rows) == spec[f"num_{split}"]
        assert [r["image_id"] for r in y_rows] == list(range(1, len(y_rows) + 1)), "image ids: sorted position"
        for c, y in zip(c_rows, y_rows):
            assert np.array_equal(np.asarray(c["image"]), np.asarray(y["image"])), "the same image, pixel for pixel"
            assert (c["width"], c["height"]) == (y["width"], y["height"]) == (64, 64)
            co, yo = c["objects"], y["objects"]
            assert len(yo["bbox"]) == len(co["bbox"]) >= 1 and yo["category"] == co["category"]
            np.testing.assert_allclose(yo["bbox"], co["bbox"], atol=1e-3, rtol=0)
            assert yo["iscrowd"] == co["iscrowd"] and yo["id"] == co["id"]
            np.testing.assert_allclose(yo["area"], [w * h for _, _, w, h in yo["bbox"]], rtol=1e-6)
        assert yolo.report[split]["annotations_kept"] == coco.report[split]["annotations_kept"]
        assert yolo.report[split]["boxes_clipped"] == 0, "rounding at the image edges is snapped, not clipped"
    assert set(yolo.report["train"]) == set(YOLO_REPORT_KEYS)


def test_make_synthetic_script_writes_yolo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["make_synthetic_coco.py", "--output_dir", str(tmp_path / "s"), "--format", "yolo", "--num_train", "2",
            "--num_val", "1", "--image_size", "48", "--num_classes", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "scripts" / "make_synthetic_coco.py"), run_name="__main__")
    config = yaml.safe_load((tmp_path / "s" / "data.yaml").read_text())
    assert config["names"] == {0: "circle", 1: "square", 2: "triangle", 3: "bar"}
    assert config["train"] == "images/train" and config["val"] == "images/val"
    assert (tmp_path / "s/images/val/1000001.png").is_file() and (tmp_path / "s/labels/val/1000001.txt").is_file()
    assert not (tmp_path / "s" / "annotations").exists()
    for line in (tmp_path / "s/labels/train/000001.txt").read_text().splitlines():
        label, *coords = line.split()
        assert label in {"0", "1", "2", "3"} and all(re.fullmatch(r"0\.\d{6}|1\.0{6}", v) for v in coords), line


# ----------------------------------------------------------------------------- data.yaml


def test_names_as_a_list_and_split_paths_under_the_path_key(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path / "data" / "shapes", format="yolo", **SHAPES)
    config = {"path": "data/shapes", "train": "images/train", "val": "images/val", "test": None,
              "names": ["a", "b", "c"]}
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(config))
    data = load_yolo_folder_with_info(tmp_path / "custom.yaml", cache_dir=str(tmp_path / "cache"))
    assert set(data.dataset) == {"train", "val"} and len(data.dataset["train"]) == 6
    assert data.label_mapping.names == ["a", "b", "c"]


def test_roboflow_style_relative_split_paths(tmp_path: Path) -> None:
    """Roboflow writes train: ../train/images beside the yaml; ultralytics retries without the ../."""
    src = tmp_path / "src"
    make_synthetic_coco(src, format="yolo", **SHAPES)
    root = tmp_path / "roboflow"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (src / "images" / split).rename(root / split / "images")
        (src / "labels" / split).rename(root / split / "labels")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "../train/images", "val": "../val/images",
                                                    "nc": 3, "names": ["circle", "square", "triangle"]}))
    ds = load_yolo_folder(root, cache_dir=str(tmp_path / "cache"))
    assert len(ds["train"]) == 6 and sum(len(r["bbox"]) for r in ds["train"]["objects"]) >= 6


@pytest.mark.parametrize("config, match", [
    ({"train": "images/train", "names": {0: "a", 2: "b"}}, r"names ids must be 0\.\.1, got \[0, 2\]"),
    ({"train": "images/train", "names": ["a"], "nc": 2}, "nc is 2 but names has 1"),
    ({"train": "images/nowhere", "names": ["a"]}, "is not a folder"),
    ({"names": ["a"]}, "no split"),
])
def test_bad_data_yaml_is_a_clear_error(yolo_dir: Path, tmp_path: Path, config: dict, match: str) -> None:
    (yolo_dir / "data.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=match):
        _load(yolo_dir, tmp_path)


# ----------------------------------------------------------------------------- bad data


def _damage(folder: Path, case: str) -> tuple[str, str]:
    """Damage the train split one way; return (the report key that counts it, what a raise names)."""
    line = {"four_numbers": "1 0.5 0.5 0.2", "text": "cat 0.5 0.5 0.2 0.2", "class_out_of_range": "3 0.5 0.5 0.2 0.2",
            "box_outside": "0 1.5 0.5 0.2 0.2"}.get(case)
    if line is not None:
        number = _append_line(folder, "000003", line)
        key = {"four_numbers": "malformed_label_lines_dropped", "text": "malformed_label_lines_dropped",
               "class_out_of_range": "class_out_of_range_dropped", "box_outside": "box_out_of_range_dropped"}[case]
        return key, re.escape(f"000003.txt:{number}: {line!r}")
    if case == "missing_label":
        _label_file(folder, "000002").unlink()
        return "images_without_label_file", ""
    if case == "missing_image":
        (folder / "images" / "train" / "000004.png").unlink()
        return "missing_images", r"000004\.\*\): missing"
    (folder / "images" / "train" / "000005.png").write_bytes(b"not a png at all")
    return "corrupt_images", r"000005\.png\): corrupt"


# Counts that move with any damage (checked on their own below); any other count may only move under its key.
_TOTALS_AND_FOLLOW_ON = ("images", "images_kept", "annotations", "annotations_kept", "orphan_annotations_dropped",
                         "images_without_annotations")
CASES = ["missing_label", "four_numbers", "text", "class_out_of_range", "box_outside", "missing_image", "corrupt"]


@pytest.mark.parametrize("case", CASES)
def test_each_bad_case_is_counted_and_the_rest_loads(yolo_dir: Path, tmp_path: Path, case: str) -> None:
    clean = _load(yolo_dir, tmp_path).report["train"]
    lost_lines = {"missing_label": _lines(yolo_dir, "000002"), "missing_image": _lines(yolo_dir, "000004"),
                  "corrupt": _lines(yolo_dir, "000005")}.get(case, 0)
    key, named = _damage(yolo_dir, case)
    data = _load(yolo_dir, tmp_path)
    report = data.report["train"]
    assert report[key] == 1, report
    changed = {k for k in report if report[k] != clean[k]} - set(_TOTALS_AND_FOLLOW_ON)
    assert changed == {key}, f"counted under {key} and nowhere else: {report}"
    lost_images = int(case in ("missing_image", "corrupt"))
    assert report["images_kept"] == len(data.dataset["train"]) == 6 - lost_images
    assert report["annotations_kept"] == clean["annotations_kept"] - lost_lines, "only the bad line is lost"
    if case == "missing_label":
        assert report["images_without_annotations"] == 1, "a missing label file is a negative image"
    if lost_images:
        assert report["orphan_annotations_dropped"] == lost_lines, "the lines of a skipped image go with it"
    assert len(data.dataset["val"]) == 2, "other splits are untouched"
    if case == "missing_label":  # not bad data: "raise" loads it too
        assert _load(yolo_dir, tmp_path, on_bad_data="raise").report["train"][key] == 1
        return
    with pytest.raises(ValueError, match=named):
        _load(yolo_dir, tmp_path, on_bad_data="raise")


def test_all_bad_cases_at_once_training_data_still_loads(yolo_dir: Path, tmp_path: Path) -> None:
    for case in CASES:
        _damage(yolo_dir, case)
    report = _load(yolo_dir, tmp_path).report["train"]
    assert report["malformed_label_lines_dropped"] == 2
    for key in ("class_out_of_range_dropped", "box_out_of_range_dropped", "missing_images", "corrupt_images",
                "images_without_label_file"):
        assert report[key] == 1, key
    dropped = sum(v for k, v in report.items() if k.endswith("_dropped"))
    assert report["annotations"] == report["annotations_kept"] + dropped, report
    assert report["images_kept"] == 4
    with pytest.raises(ValueError, match="bad"):  # the first bad item (images are checked before labels)
        _load(yolo_dir, tmp_path, on_bad_data="raise")


def test_edges_within_tolerance_are_snapped_boxes_past_an_edge_clipped(yolo_dir: Path, tmp_path: Path) -> None:
    path = _label_file(yolo_dir, "000001")
    # right edge at 1 + 5e-7 (rounding): snapped; a box centred near the bottom edge: clipped at 48 px
    path.write_text("0 0.7500005 0.5 0.5 0.25\n1 0.5 0.95 0.25 0.2\n")
    data = _load(yolo_dir, tmp_path)
    row = data.dataset["train"][0]
    np.testing.assert_allclose(row["objects"]["bbox"], [[24, 18, 24, 12], [18, 40.8, 12, 7.2]], atol=1e-3)
    assert data.report["train"]["boxes_clipped"] == 1


def test_exif_rotated_image_uses_the_rotated_frame_like_ultralytics(yolo_dir: Path, tmp_path: Path) -> None:
    """Ultralytics normalises labels by the EXIF-rotated image; rows decode rotated and keep the box on it."""
    shown = Image.new("RGB", (40, 60), (20, 20, 20))
    shown.paste((230, 30, 30), (8, 30, 28, 50))  # the box as displayed: x 8..27, y 30..49
    exif = Image.Exif()
    exif[0x0112] = 6  # shown = stored rotated 90 degrees clockwise
    stored = shown.transpose(Image.Transpose.ROTATE_90)
    stored.save(yolo_dir / "images" / "train" / "000001.jpg", exif=exif.tobytes(), quality=95)
    (yolo_dir / "images" / "train" / "000001.png").unlink()
    _label_file(yolo_dir, "000001").write_text(f"0 {18 / 40} {40 / 60} {20 / 40} {20 / 60}\n")
    data = _load(yolo_dir, tmp_path)
    row = data.dataset["train"][0]
    assert data.report["train"]["exif_rotated_images"] == 1
    assert row["image"].size == (row["width"], row["height"]) == (40, 60)
    np.testing.assert_allclose(row["objects"]["bbox"], [[8, 30, 20, 20]], atol=1e-3)
    inside = np.asarray(row["image"])[32:48, 10:26]
    assert inside[..., 0].mean() > 180 and inside[..., 1].mean() < 80, "the box lies on the red square"


def test_cache_follows_label_files(yolo_dir: Path, tmp_path: Path) -> None:
    first = _load(yolo_dir, tmp_path).dataset["train"]
    assert _load(yolo_dir, tmp_path).dataset["train"].cache_files == first.cache_files, "unchanged: reused"
    _label_file(yolo_dir, "000001").write_text("2 0.5 0.5 0.5 0.5\n")
    edited = _load(yolo_dir, tmp_path).dataset["train"]
    assert edited.cache_files != first.cache_files
    assert edited[0]["objects"]["category"] == [2] and edited[0]["objects"]["bbox"] == [[12.0, 12.0, 24.0, 24.0]]


# ----------------------------------------------------------------------------- training


def test_training_on_a_yolo_folder(yolo_dir: Path, tmp_path: Path, caplog) -> None:
    _append_line(yolo_dir, "000003", "1 0.5 0.5 0.2")  # bad data does not stop training
    out = tmp_path / "run"
    args = tiny_run_args(out, tmp_path / "cache", "--yolo_dir", str(yolo_dir), "--picture_images", "0",
                         "--checkpointing_epochs", "0", steps=2)
    with caplog.at_level("INFO", logger="modeling_detr_custom"):
        results = TRAIN["main"](args)
    assert results["global_step"] == 2
    assert "malformed_label_lines_dropped': 1" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
