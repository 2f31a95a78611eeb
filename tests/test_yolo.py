"""YOLO (ultralytics layout) folders as a data source: the COCO loader's rows, bad label lines, training on one."""

from __future__ import annotations

import json
import re
import runpy
import shutil
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


def test_split_lists_of_image_paths_and_of_folders(yolo_dir: Path, tmp_path: Path) -> None:
    """train: a .txt list of image paths (./x relative to the list, as ultralytics, other relative paths too, and
    absolute ones); val: a yaml list of image folders, each with its own labels folder."""
    listed = ["./images/train/000001.png", "images/train/000002.png", str(yolo_dir / "images/train/000004.png"),
              "images/train/notes.md"]  # only image files count
    (yolo_dir / "train.txt").write_text("\n".join(listed) + "\n")
    for kind, name in (("images", "000006.png"), ("labels", "000006.txt")):
        (yolo_dir / kind / "extra").mkdir()
        shutil.copy(yolo_dir / kind / "train" / name, yolo_dir / kind / "extra")
    config = {"train": "train.txt", "val": ["images/val", "images/extra"], "names": ["circle", "square", "triangle"]}
    (yolo_dir / "data.yaml").write_text(yaml.safe_dump(config))
    data = _load(yolo_dir, tmp_path)
    train, val = data.report["train"], data.report["val"]
    assert train["images_kept"] == 3 and train["images_without_label_file"] == 0
    assert train["annotations_kept"] == sum(_lines(yolo_dir, s) for s in ("000001", "000002", "000004"))
    assert val["images_kept"] == 2 + 1 and val["images_without_label_file"] == 0 and val["missing_images"] == 0


@pytest.mark.parametrize("config, match", [
    ({"train": "images/train", "names": {0: "a", 2: "b"}}, r"names ids must be 0\.\.1, got \[0, 2\]"),
    ({"train": "images/train", "names": ["a"], "nc": 2}, "nc is 2 but names has 1"),
    ({"train": "images/nowhere", "names": ["a"]}, "is not a folder"),
    ({"names": ["a"]}, "no split"),
    ({"train": ["images/train", 3], "names": ["a"]}, "train must be an image folder or a .txt list"),
    ({"train": "data.yaml", "names": ["a"]}, "is not a folder or a .txt list of image paths"),
    ({"train": "images/train", "names": ["a"], "kpt_shape": [17, 4]}, r"kpt_shape must be \[keypoints, 2 or 3\]"),
])
def test_bad_data_yaml_is_a_clear_error(yolo_dir: Path, tmp_path: Path, config: dict, match: str) -> None:
    (yolo_dir / "data.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=match):
        _load(yolo_dir, tmp_path)


# ----------------------------------------------------------------------------- bad data


def _damage(folder: Path, case: str) -> tuple[str, str]:
    """Damage the train split one way; return (the report key that counts it, what a raise names)."""
    if case == "duplicate":  # ultralytics drops a repeated line; not bad data
        _append_line(folder, "000003", _label_file(folder, "000003").read_text().splitlines()[0])
        return "duplicate_labels_dropped", ""
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
CASES = ["missing_label", "duplicate", "missing_image", "corrupt"]


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
    if not named:  # not bad data: "raise" loads it too
        assert _load(yolo_dir, tmp_path, on_bad_data="raise").report["train"][key] == 1
        return
    with pytest.raises(ValueError, match=named):
        _load(yolo_dir, tmp_path, on_bad_data="raise")


def test_all_bad_cases_at_once_training_data_still_loads(yolo_dir: Path, tmp_path: Path) -> None:
    for case in CASES:
        _damage(yolo_dir, case)
    report = _load(yolo_dir, tmp_path).report["train"]
    for key in ("duplicate_labels_dropped", "missing_images", "corrupt_images", "images_without_label_file"):
        assert report[key] == 1, key
    dropped = sum(v for k, v in report.items() if k.endswith("_dropped"))
    assert report["annotations"] == report["annotations_kept"] + dropped, report
    assert report["images_kept"] == 4
    with pytest.raises(ValueError, match="bad"):  # the first bad item (images are checked before labels)
        _load(yolo_dir, tmp_path, on_bad_data="raise")


# ----------------------------------------------------------------------------- lines that are not YOLO


_EXPECTED = re.escape("expected 5 (class cx cy w h) or a polygon (class x1 y1 ... xn yn)")


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2 0.2 0.93", f"6 values; {_EXPECTED} \\(a 6th column is typically a confidence"),
    ("0 0.1 0.1 0.2 0.1 0.2 0.2 0.1", f"8 values; {_EXPECTED}"),
    ("1 0.5 0.5 0.2", f"4 values; {_EXPECTED}"),
    ("cat 0.5 0.5 0.2 0.2", f"'cat' is not a number; {_EXPECTED}"),
    ("0 nan 0.5 0.2 0.2", "nan is not a finite number"),
    ("1.5 0.5 0.5 0.2 0.2", "class 1.5 is not a whole number"),
    ("3 0.5 0.5 0.2 0.2", re.escape("class 3 is not one of the 3 classes of data.yaml's names (0..2)")),
    ("0 24 24 10 10", re.escape("24 is outside [0, 1]: these look like pixel coordinates; YOLO coordinates are "
                                "normalised by the image width and height")),
    ("0 -0.5 0.5 0.2 0.2", re.escape("-0.5 is outside [0, 1]: YOLO coordinates")),
])
@pytest.mark.parametrize("on_bad_data", ["skip", "raise"])
def test_a_line_that_is_not_yolo_is_an_error_naming_file_and_line(yolo_dir: Path, tmp_path: Path, line: str,
                                                                  message: str, on_bad_data: str) -> None:
    """Skipping such lines trained on whatever was left (nothing, for a folder of them): refused in both modes."""
    total = _load(yolo_dir, tmp_path).report["train"]["annotations"] + 1
    number = _append_line(yolo_dir, "000003", line)
    counted = re.escape(f"(1 of the split's {total} label lines, in 1 file(s), are like this in split 'train')")
    with pytest.raises(ValueError, match=f"000003\\.txt line {number}: {message}.* {counted}$") as error:
        _load(yolo_dir, tmp_path, on_bad_data=on_bad_data)
    assert "\n" not in str(error.value)


def test_pixel_coordinates_everywhere_are_one_error_that_counts_them(yolo_dir: Path, tmp_path: Path) -> None:
    """The issue's folder: every label in pixels. It trained on zero boxes and exited 0; now it says so."""
    total = 0
    for path in sorted((yolo_dir / "labels" / "train").glob("*.txt")):
        rows = [line.split() for line in path.read_text().splitlines()]
        path.write_text("".join(f"{c} " + " ".join(f"{float(v) * 48:.1f}" for v in vs) + "\n" for c, *vs in rows))
        total += len(rows)
    with pytest.raises(ValueError, match="these look like pixel coordinates") as error:
        _load(yolo_dir, tmp_path)
    assert re.search(r"labels/train/000001\.txt line 1: \d+(\.\d+)? is outside \[0, 1\]", str(error.value))
    assert f"({total} of the split's {total} label lines, in 6 file(s), are like this in split 'train')" \
        in str(error.value)


def test_training_on_confidence_columns_stops_with_the_error(yolo_dir: Path, tmp_path: Path) -> None:
    """Predictions saved with their confidence (6 columns) used to train on zero boxes and report AP -1."""
    for path in (yolo_dir / "labels" / "train").glob("*.txt"):
        path.write_text("".join(f"{line} 0.9\n" for line in path.read_text().splitlines()))
    args = tiny_run_args(tmp_path / "run", tmp_path / "cache", "--yolo_dir", str(yolo_dir), steps=2)
    with pytest.raises(ValueError, match=r"000001\.txt line 1: 6 values; expected 5") as error:
        TRAIN["main"](args)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- what ultralytics also reads


def test_polygon_labels_are_read_as_their_bounding_boxes(yolo_dir: Path, tmp_path: Path) -> None:
    clean = _load(yolo_dir, tmp_path)
    _label_file(yolo_dir, "000001").write_text(
        "0 0.25 0.25 0.75 0.25 0.5 0.75\n"  # a triangle: x 0.25..0.75, y 0.25..0.75
        "1 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n"  # a rectangle of 4 points
        "2 1.005 0.5 0.9 0.4 0.9 0.6\n")  # a point 0.5% past the right edge (ultralytics' 1% tolerance): clipped
    data = _load(yolo_dir, tmp_path)
    row = data.dataset["train"][0]
    np.testing.assert_allclose(row["objects"]["bbox"], [[12, 12, 24, 24], [4.8, 4.8, 9.6, 14.4],
                                                        [43.2, 19.2, 4.8, 9.6]], atol=1e-3)
    assert row["objects"]["category"] == [0, 1, 2]
    report = data.report["train"]
    assert report["polygon_labels"] == 3 and report["boxes_clipped"] == 1
    for column in ("bbox", "category"):
        kept = [objects[column] for objects in data.dataset["train"]["objects"][1:]]
        assert kept == [objects[column] for objects in clean.dataset["train"]["objects"][1:]], "box files as before"


@pytest.mark.parametrize("on_bad_data", ["skip", "raise"])
def test_a_file_mixing_boxes_and_polygons_is_refused_as_ultralytics_does(yolo_dir: Path, tmp_path: Path,
                                                                          on_bad_data: str) -> None:
    number = _append_line(yolo_dir, "000003", "0 0.25 0.25 0.75 0.25 0.5 0.75")
    with pytest.raises(ValueError, match=f"000003\\.txt: line 1 is a box and line {number} a polygon; "
                                         "ultralytics refuses label files that mix the two"):
        _load(yolo_dir, tmp_path, on_bad_data=on_bad_data)


def test_pose_lines_are_boxes_when_the_yaml_has_kpt_shape(yolo_dir: Path, tmp_path: Path) -> None:
    """9 values: a box and 2 keypoints of 2 dims under kpt_shape [2, 2] (else it would be a 4-point polygon)."""
    config = yaml.safe_load((yolo_dir / "data.yaml").read_text())
    (yolo_dir / "data.yaml").write_text(yaml.safe_dump({**config, "kpt_shape": [2, 2]}))
    _label_file(yolo_dir, "000001").write_text("1 0.5 0.5 0.5 0.5 0.3 0.3 0.6 0.6\n")
    data = _load(yolo_dir, tmp_path)
    row = data.dataset["train"][0]
    assert row["objects"]["bbox"] == [[12.0, 12.0, 24.0, 24.0]] and data.report["train"]["polygon_labels"] == 0


def test_a_label_file_with_a_byte_order_mark_is_read(yolo_dir: Path, tmp_path: Path) -> None:
    _label_file(yolo_dir, "000001").write_bytes("\ufeff2 0.5 0.5 0.5 0.5\n".encode())
    assert _load(yolo_dir, tmp_path).dataset["train"][0]["objects"]["category"] == [2]


def _rows_by_image(dataset) -> dict[str, dict]:
    """Rows' boxes and classes by their image path relative to the yolo folder's images/train."""
    return {row["image"].filename.split("/images/train/")[-1]: (row["objects"]["bbox"], row["objects"]["category"])
            for row in dataset}


def _move(folder: Path, stem: str, sub: str) -> None:
    """Move a train image and its label file to the same subfolder of images/train and labels/train."""
    for kind, ext in (("images", "png"), ("labels", "txt")):
        (folder / kind / "train" / sub).mkdir(parents=True, exist_ok=True)
        (folder / kind / "train" / f"{stem}.{ext}").rename(folder / kind / "train" / sub / f"{stem}.{ext}")


def test_images_in_subfolders_at_any_depth_with_their_mirrored_labels(yolo_dir: Path, tmp_path: Path) -> None:
    flat = _rows_by_image(_load(yolo_dir, tmp_path).dataset["train"])
    for stem, sub in (("000001", "a"), ("000002", "a"), ("000003", "a/b"), ("000004", "a/b/c")):
        _move(yolo_dir, stem, sub)
    for kind, old, new in (("images", "000005.png", "d/000001.png"), ("labels", "000005.txt", "d/000001.txt")):
        (yolo_dir / kind / "train" / "d").mkdir()  # the same name as a/000001.png, with its own label
        (yolo_dir / kind / "train" / old).rename(yolo_dir / kind / "train" / new)
    hidden = yolo_dir / "images/train/.ipynb_checkpoints"  # hidden folders are skipped, as ultralytics' glob does
    hidden.mkdir()
    shutil.copy(yolo_dir / "images/train/000006.png", hidden)
    data = _load(yolo_dir, tmp_path)
    nested = _rows_by_image(data.dataset["train"])
    assert sorted(nested) == ["000006.png", "a/000001.png", "a/000002.png", "a/b/000003.png", "a/b/c/000004.png",
                              "d/000001.png"], "sorted by path"
    for name, objects in nested.items():
        assert objects == flat[name.replace("d/000001", "000005").split("/")[-1]], name
    report = data.report["train"]
    assert report["images_kept"] == 6 and report["images_without_label_file"] == 0
    assert report["annotations_kept"] == sum(len(boxes) for boxes, _ in flat.values())
def test_edges_within_tolerance_are_snapped_boxes_past_an_edge_clipped(yolo_dir: Path, tmp_path: Path) -> None:
    path = _label_file(yolo_dir, "000001")
    # right edge at 1 + 5e-7 (rounding): snapped; a box centred near the bottom edge: clipped at 48 px;
    # a centre 0.5% past the left edge (within ultralytics' 1% tolerance): clipped too
    path.write_text("0 0.7500005 0.5 0.5 0.25\n1 0.5 0.95 0.25 0.2\n2 -0.005 0.5 0.25 0.25\n")
    data = _load(yolo_dir, tmp_path)
    row = data.dataset["train"][0]
    np.testing.assert_allclose(row["objects"]["bbox"], [[24, 18, 24, 12], [18, 40.8, 12, 7.2], [0, 18, 5.76, 12]],
                               atol=1e-3)
    assert data.report["train"]["boxes_clipped"] == 2


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
    _damage(yolo_dir, "missing_image")  # bad data that "skip" skips does not stop training
    out = tmp_path / "run"
    args = tiny_run_args(out, tmp_path / "cache", "--yolo_dir", str(yolo_dir), "--picture_images", "0",
                         "--checkpointing_epochs", "0", steps=2)
    with caplog.at_level("INFO", logger="modeling_detr_custom"):
        results = TRAIN["main"](args)
    assert results["global_step"] == 2
    assert "missing_images': 1" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
