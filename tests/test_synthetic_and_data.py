"""Synthetic COCO generator and the detection dataset loader (schema, labels, cache, bad data)."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from modeling_detr_custom.data import (
    REPORT_KEYS,
    find_split,
    load_coco_folder,
    load_coco_folder_with_info,
    load_detection_dataset,
    make_synthetic_coco,
    metric_references,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def coco_dir(tmp_path: Path) -> Path:
    """6 train + 3 val images of 64 px, categories with COCO-like gaps (1, 3, 7)."""
    out = tmp_path / "shapes"
    make_synthetic_coco(out, num_train=6, num_val=3, image_size=64, seed=1, category_ids=(1, 3, 7))
    return out


def _load(coco_dir: Path, tmp_path: Path, **kwargs):
    return load_coco_folder_with_info(coco_dir, cache_dir=str(tmp_path / "cache"), **kwargs)


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_valid_coco(coco_dir: Path) -> None:
    coco = _quiet_coco(coco_dir / "annotations" / "instances_train.json")
    assert len(coco.getImgIds()) == 6 and coco.getCatIds() == [1, 3, 7]
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        img = coco.loadImgs(ann["image_id"])[0]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        assert 0.15 * 64 - 1 <= max(w, h) <= 0.5 * 64 + 1, "shapes must be 15-50% of the side"
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
    for img in coco.loadImgs(coco.getImgIds()):
        assert Image.open(coco_dir / "images" / "train" / img["file_name"]).size == (64, 64)
        assert 1 <= len(coco.getAnnIds(imgIds=img["id"])) <= 3
    val = json.loads((coco_dir / "annotations" / "instances_val.json").read_text())
    assert not {i["id"] for i in val["images"]} & set(coco.getImgIds()), "image ids unique across splits"


def test_synthetic_boxes_are_tight(coco_dir: Path) -> None:
    """Each box's border rows/columns contain shape pixels (the shape colour differs from the corners)."""
    coco = json.loads((coco_dir / "annotations" / "instances_train.json").read_text())
    for ann in coco["annotations"]:
        img = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        px = np.asarray(Image.open(coco_dir / "images" / "train" / img["file_name"])).astype(int)
        x, y, w, h = (int(v) for v in ann["bbox"])
        patch = px[y:y + h, x:x + w]
        colour = px[y + h - 1, x + w // 2]  # bottom centre is inside every shape kind
        inside = np.abs(patch - colour).sum(-1) < 30
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a, b, c = (make_synthetic_coco(tmp_path / n, num_train=3, num_val=1, image_size=48, seed=s)
               for n, s in (("a", 5), ("b", 5), ("c", 6)))
    assert a["train"].read_text() == b["train"].read_text() != c["train"].read_text()
    assert ((tmp_path / "a/images/train/000001.png").read_bytes()
            == (tmp_path / "b/images/train/000001.png").read_bytes())


def test_make_synthetic_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["make_synthetic_coco.py", "--output_dir", str(tmp_path / "s"), "--num_train", "2", "--num_val", "1",
            "--image_size", "48", "--num_classes", "4", "--seed", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "scripts" / "make_synthetic_coco.py"), run_name="__main__")
    coco = json.loads((tmp_path / "s/annotations/instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle", "bar"]
    assert len(coco["images"]) == 2 and (tmp_path / "s/images/val/1000001.png").exists()


# ----------------------------------------------------------------------------- loader: schema and labels


def test_loader_schema_and_raw_coco_ids(coco_dir: Path, tmp_path: Path) -> None:
    data = _load(coco_dir, tmp_path)
    ds = data.dataset
    assert set(ds) == {"train", "val"} and len(ds["train"]) == 6 and len(ds["val"]) == 3
    feats = ds["train"].features
    assert isinstance(feats["image"], datasets.Image)
    assert set(feats["objects"]) == {"id", "area", "bbox", "category", "iscrowd"}
    names = feats["objects"]["category"].feature.names
    assert len(names) == 8 and names[1] == "circle" and names[3] == "square" and names[7] == "triangle"
    assert all(names[i].startswith("N/A") for i in (0, 2, 4, 5, 6))
    m = data.label_mapping
    assert m.label_to_category_id == {1: 1, 3: 3, 7: 7}
    assert m.id2label[2] == "N/A" and m.id2label[7] == "triangle" and len(m.id2label) == 8
    assert m.label2id == {"circle": 1, "square": 3, "triangle": 7}
    gt = json.loads((coco_dir / "annotations" / "instances_train.json").read_text())
    row = ds["train"][0]
    anns = [a for a in gt["annotations"] if a["image_id"] == row["image_id"]]
    assert row["objects"]["bbox"] == [a["bbox"] for a in anns], "bbox stays absolute COCO xywh"
    assert row["objects"]["category"] == [a["category_id"] for a in anns]
    assert row["image"].size == (row["width"], row["height"]) == (64, 64)
    assert data.report["train"]["images_kept"] == 6 and set(data.report["train"]) == set(REPORT_KEYS)


def test_loader_contiguous_labels(coco_dir: Path, tmp_path: Path) -> None:
    data = _load(coco_dir, tmp_path, contiguous_labels=True)
    assert data.dataset["train"].features["objects"]["category"].feature.names == ["circle", "square", "triangle"]
    assert data.label_mapping.label_to_category_id == {0: 1, 1: 3, 2: 7}
    assert data.label_mapping.id2label == {0: "circle", 1: "square", 2: "triangle"}
    gt = json.loads((coco_dir / "annotations" / "instances_train.json").read_text())
    to_label = {1: 0, 3: 1, 7: 2}
    for row in data.dataset["train"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == row["image_id"]]
        assert row["objects"]["category"] == [to_label[a["category_id"]] for a in anns]
    refs = metric_references(data.dataset["train"], data.label_mapping.label_to_category_id)
    assert sorted(c for r in refs for c in r["category_ids"]) == sorted(a["category_id"] for a in gt["annotations"])


def test_coco2017_layout(tmp_path: Path) -> None:
    """COCO's own names: train2017/ + annotations/instances_train2017.json -> split "train"."""
    src = tmp_path / "src"
    make_synthetic_coco(src, num_train=2, num_val=1, image_size=48)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (src / "images" / split).rename(root / f"{split}2017")
        (src / "annotations" / f"instances_{split}.json").rename(root / "annotations" / f"instances_{split}2017.json")
    ds = load_coco_folder(root, cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "val"} and len(ds["train"]) == 2
    assert find_split(ds, "train") == "train" and find_split(ds, "eval") == "val"


def test_cache_follows_annotation_file(coco_dir: Path, tmp_path: Path) -> None:
    first = _load(coco_dir, tmp_path).dataset["train"]
    again = _load(coco_dir, tmp_path).dataset["train"]
    assert again.cache_files == first.cache_files, "unchanged files reuse the cache"
    ann_file = coco_dir / "annotations" / "instances_train.json"
    _edit_json(ann_file, lambda d: d["annotations"][0].update(bbox=[1.0, 2.0, 10.0, 11.0]))
    edited = _load(coco_dir, tmp_path).dataset["train"]
    assert edited.cache_files != first.cache_files
    image_id = json.loads(ann_file.read_text())["annotations"][0]["image_id"]
    row = edited.filter(lambda r: r["image_id"] == image_id)[0]
    assert [1.0, 2.0, 10.0, 11.0] in row["objects"]["bbox"]


# ----------------------------------------------------------------------------- loader: bad data


def _first_image(coco_dir: Path) -> tuple[dict, Path]:
    img = json.loads((coco_dir / "annotations" / "instances_train.json").read_text())["images"][0]
    return img, coco_dir / "images" / "train" / img["file_name"]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_image_skipped_or_raised(coco_dir: Path, tmp_path: Path, damage: str) -> None:
    img, path = _first_image(coco_dir)
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"not a png at all")
    data = _load(coco_dir, tmp_path, splits=["train"])
    report = data.report["train"]
    assert report[f"{damage}_images"] == 1 and report["images_kept"] == 5
    assert img["id"] not in data.dataset["train"]["image_id"]
    assert report["orphan_annotations_dropped"] >= 1, "its annotations are dropped with it"
    with pytest.raises(ValueError, match=damage):
        _load(coco_dir, tmp_path, splits=["train"], on_bad_data="raise")


def test_bad_boxes_clipped_dropped_and_unknown_category(coco_dir: Path, tmp_path: Path) -> None:
    ann_file = coco_dir / "annotations" / "instances_train.json"
    gt = json.loads(ann_file.read_text())
    a0, a1, a2 = gt["annotations"][:3]

    def damage(d):
        d["annotations"][0]["bbox"] = [50.0, 40.0, 30.0, 10.0]  # beyond the 64 px right border
        d["annotations"][1]["bbox"] = [5.0, 5.0, 0.0, 8.0]  # zero width
        d["annotations"][2]["category_id"] = 99  # not in categories

    _edit_json(ann_file, damage)
    data = _load(coco_dir, tmp_path, splits=["train"])
    report = data.report["train"]
    assert (report["boxes_clipped"], report["zero_area_boxes_dropped"], report["unknown_category_dropped"]) == (1, 1, 1)
    assert report["annotations_kept"] == len(gt["annotations"]) - 2 and report["images_kept"] == 6
    ds = data.dataset["train"]
    row = ds.filter(lambda r: r["image_id"] == a0["image_id"])[0]
    assert [50.0, 40.0, 14.0, 10.0] in row["objects"]["bbox"], "clipped to the image, still xywh"
    all_ids = [i for objs in ds["objects"] for i in objs["id"]]
    assert a1["id"] not in all_ids and a2["id"] not in all_ids
    with pytest.raises(ValueError, match="category_id 99"):
        _load(coco_dir, tmp_path, splits=["train"], on_bad_data="raise")


def test_image_without_annotations_is_kept(coco_dir: Path, tmp_path: Path) -> None:
    img, _ = _first_image(coco_dir)
    _edit_json(coco_dir / "annotations" / "instances_train.json",
               lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != img["id"]]))
    data = _load(coco_dir, tmp_path, splits=["train"], on_bad_data="raise")  # not an error
    assert data.report["train"]["images_without_annotations"] == 1
    row = data.dataset["train"].filter(lambda r: r["image_id"] == img["id"])[0]
    assert row["objects"]["bbox"] == [] and row["objects"]["category"] == []


def test_exif_rotation_is_not_applied(tmp_path: Path) -> None:
    """COCO boxes are in the stored pixel grid; datasets.Image would rotate EXIF-tagged images."""
    root = tmp_path / "exif"
    (root / "images" / "train").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "images/train/a.jpg", exif=exif.tobytes())
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 30, 10], "area": 300,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations").mkdir()
    (root / "annotations/instances_train.json").write_text(json.dumps(coco))
    data = _load(root, tmp_path)
    assert data.report["train"]["exif_rotated_images"] == 1
    assert data.dataset["train"][0]["image"].size == (40, 20)


# ----------------------------------------------------------------------------- one entry point


def test_load_detection_dataset_sources(coco_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_coco = load_detection_dataset(coco_dir=coco_dir, cache_dir=str(tmp_path / "cache"))
    assert from_coco.annotation_files["val"].name == "instances_val.json"
    saved = tmp_path / "saved"
    from_coco.dataset.save_to_disk(str(saved))
    from_disk = load_detection_dataset(dataset_path=saved)
    assert from_disk.dataset["train"]["image_id"] == from_coco.dataset["train"]["image_id"]
    assert from_disk.label_mapping.id2label == from_coco.label_mapping.id2label
    assert from_disk.label_mapping.label_to_category_id == {1: 1, 3: 3, 7: 7}
    # the Hub path (no network here): same code path with datasets.load_dataset stubbed
    hub = from_coco.dataset.remove_columns("image_id")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: hub if name == "org/shapes" else None)
    from_hub = load_detection_dataset("org/shapes")
    assert from_hub.dataset["val"]["image_id"] == [0, 1, 2], "row index when the Hub dataset has no image_id"
    with pytest.raises(ValueError, match="exactly one"):
        load_detection_dataset("org/shapes", coco_dir=coco_dir)


def test_schema_validation_names_missing_column(coco_dir: Path, tmp_path: Path) -> None:
    ds = load_coco_folder(coco_dir, cache_dir=str(tmp_path / "cache"))
    no_objects = tmp_path / "no_objects"
    ds.remove_columns("objects").save_to_disk(str(no_objects))
    with pytest.raises(ValueError, match="'objects'"):
        load_detection_dataset(dataset_path=no_objects)
    no_bbox = tmp_path / "no_bbox"
    features = datasets.Features({"image": datasets.Image(),
                                  "objects": {"category": datasets.List(datasets.ClassLabel(names=["a", "b"]))}})
    image = str(next((coco_dir / "images" / "train").iterdir()))
    datasets.Dataset.from_dict({"image": [image], "objects": [{"category": [1]}]},
                               features=features).save_to_disk(str(no_bbox))
    with pytest.raises(ValueError, match="'bbox'"):
        load_detection_dataset(dataset_path=no_bbox)
