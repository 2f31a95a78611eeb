"""The one data check of every source (data/inspection.py, data/box_format.py), run by train.py, evaluate_model.py
and scripts/inspect_data.py, and the data pictures (data/pictures.py)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from test_training import (  # noqa: F401 (fresh_accelerate_state: an autouse fixture)
    EVALUATE,
    TRAIN,
    ann,
    bad_data_coco,
    fresh_accelerate_state,
    fresh_accelerate_state_reset,
    mixed_size_coco,
    tiny_run_args,
    write_coco,
)

from modeling_detr_custom.checks import run_cli
from modeling_detr_custom.data import (
    SYNTHETIC_DEFAULTS,
    CheckSettings,
    check_dataset,
    load_coco_folder_with_info,
    load_detection_dataset,
    make_synthetic_coco,
)
from modeling_detr_custom.data.box_format import MIN_BOXES
from modeling_detr_custom.drawing import LEGEND_ROW_HEIGHT, label_colour
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.outputs import DATA_PICTURE_FILE, TRAINING_INPUTS_PICTURE_FILE
from modeling_detr_custom.training import parse_train_args, resolve_options
from modeling_detr_custom.training.data_check import training_resizes

REPO = Path(__file__).resolve().parents[1]
INSPECT = runpy.run_path(str(REPO / "scripts" / "inspect_data.py"), run_name="inspect_script")


def inspect(tmp_path: Path, *args: str):
    """scripts/inspect_data.py's main with a tiny model at 64 px; returns its DataReport."""
    return INSPECT["main"](["--model_config", "tiny", "--image_size", "64", "--cache_dir", str(tmp_path / "cache"),
                            "--output_dir", str(tmp_path / "out"), *args])


def shapes(tmp_path: Path, name: str = "shapes", **spec) -> Path:
    """20 train + 4 val synthetic 64 px images with 2-3 shapes each (40-60 boxes: over the finding's minimum)."""
    spec = {"num_train": 20, "num_val": 4, "image_size": 64, "seed": 3, "min_shapes": 2, "max_shapes": 3, **spec}
    make_synthetic_coco(tmp_path / name, **spec)
    return tmp_path / name


def rewrite_boxes(folder: Path, fn, splits=("train", "val")) -> None:
    """Replace every annotation's bbox with ``fn(bbox, image)`` in the COCO folder's json files."""
    for split in splits:
        path = folder / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        images = {img["id"]: img for img in coco["images"]}
        for a in coco["annotations"]:
            a["bbox"] = fn(a["bbox"], images[a["image_id"]])
        path.write_text(json.dumps(coco))


def as_xyxy(box, image):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def as_normalised(box, image):
    x, y, w, h = box
    return [x / image["width"], y / image["height"], w / image["width"], h / image["height"]]


def rows_boxes(data, split: str = "train") -> np.ndarray:
    return np.concatenate([np.asarray(o["bbox"], dtype=np.float64).reshape(-1, 4)
                           for o in data.dataset[split]["objects"]])


def saved_with_boxes(data, folder: Path, fn) -> Path:
    """``data``'s dataset saved with each row's boxes replaced by ``fn(boxes xywh)`` (a Hub / saved source)."""
    def edit(objects):
        return {"objects": {**objects, "bbox": [fn(list(b)) for b in objects["bbox"]]}}

    data.dataset.map(edit, input_columns="objects").save_to_disk(str(folder))
    return folder


# ----------------------------------------------------------------------------- box formats


def test_xyxy_boxes_in_a_coco_file_are_named_and_declared_with_box_format(tmp_path: Path) -> None:
    folder = shapes(tmp_path)
    original = load_coco_folder_with_info(folder, cache_dir=str(tmp_path / "c0"))
    rewrite_boxes(folder, as_xyxy)
    with pytest.raises(ValueError, match=r"instances_train\.json: boxes look like xyxy, not xywh: \d+ of \d+ end "
                                         r"past the image read as xywh, \d+ lie inside it as xyxy; pass --box_format "
                                         r"xyxy"):
        inspect(tmp_path, "--coco_dir", str(folder))
    report = inspect(tmp_path, "--coco_dir", str(folder), "--box_format", "xyxy")
    assert report.splits["train"].boxes == original.report["train"]["annotations_kept"]
    declared = load_coco_folder_with_info(folder, cache_dir=str(tmp_path / "c1"), box_format="xyxy")
    np.testing.assert_allclose(rows_boxes(declared), rows_boxes(original), atol=1e-4)
    assert declared.report["train"]["boxes_clipped"] == 0, "read as xyxy, nothing sticks out of the image"


def test_normalised_boxes_in_a_coco_file_are_named(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = shapes(tmp_path)
    original = load_coco_folder_with_info(folder, cache_dir=str(tmp_path / "c0"))
    rewrite_boxes(folder, as_normalised)
    monkeypatch.setattr(sys, "argv", ["inspect_data.py", "--coco_dir", str(folder), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="1"):  # the script's way: one line on stderr, no traceback
        run_cli(INSPECT["main"])
    err = capsys.readouterr().err  # (the progress bars of the load above come first)
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "look normalised" in last and "Traceback" not in err, err
    with pytest.raises(ValueError, match=r"boxes look normalised to \[0, 1\], not absolute pixels: (\d+) of \1 boxes "
                                         r".*pass --box_format xywh_normalized"):
        inspect(tmp_path, "--coco_dir", str(folder))
    declared = load_coco_folder_with_info(folder, cache_dir=str(tmp_path / "c1"), box_format="xywh_normalized")
    np.testing.assert_allclose(rows_boxes(declared), rows_boxes(original), atol=1e-4)


def test_saved_dataset_boxes_are_checked_against_the_declared_format_and_converted(tmp_path: Path) -> None:
    original = load_coco_folder_with_info(shapes(tmp_path), cache_dir=str(tmp_path / "c0"))
    saved = saved_with_boxes(original, tmp_path / "saved_xyxy", lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])
    with pytest.raises(ValueError, match=r"saved_xyxy split 'train': boxes look like xyxy, not xywh: .*--box_format "
                                         "xyxy"):
        inspect(tmp_path, "--dataset_path", str(saved))
    declared = load_detection_dataset(dataset_path=saved, box_format="xyxy")
    np.testing.assert_allclose(rows_boxes(declared), rows_boxes(original), atol=1e-4)
    # pixels declared as YOLO-style normalised centres: the numbers name the pixel format
    plain = saved_with_boxes(original, tmp_path / "saved_xywh", list)
    with pytest.raises(ValueError, match=r"boxes look like xywh, not cxcywh_normalized: .*--box_format xywh"):
        load_detection_dataset(dataset_path=plain, box_format="cxcywh_normalized")
    centres = saved_with_boxes(original, tmp_path / "saved_cxcywh_normalized",
                               lambda b: [(b[0] + b[2] / 2) / 64, (b[1] + b[3] / 2) / 64, b[2] / 64, b[3] / 64])
    declared = load_detection_dataset(dataset_path=centres, box_format="cxcywh_normalized")
    np.testing.assert_allclose(rows_boxes(declared), rows_boxes(original), atol=1e-4)


def test_few_boxes_or_a_few_border_crossing_boxes_are_no_alarm(tmp_path: Path) -> None:
    few = shapes(tmp_path, "few", num_train=3, num_val=1, min_shapes=1, max_shapes=2)  # under MIN_BOXES per split
    rewrite_boxes(few, as_xyxy)
    assert len(json.loads((few / "annotations/instances_train.json").read_text())["annotations"]) < MIN_BOXES
    load_coco_folder_with_info(few, cache_dir=str(tmp_path / "c0"))
    border = shapes(tmp_path, "border")
    path = border / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    for a in coco["annotations"][:3]:  # 3 of 40+ boxes overshoot the right edge by 6 px, as sloppy labels do
        a["bbox"][2] = 64 - a["bbox"][0] + 6
    path.write_text(json.dumps(coco))
    data = load_coco_folder_with_info(border, cache_dir=str(tmp_path / "c1"))
    assert data.report["train"]["boxes_clipped"] == 3, "clipped as before, not mistaken for another format"


def test_the_declared_box_format_is_part_of_the_cache_key(tmp_path: Path) -> None:
    """Too few boxes for a finding, so both readings load: the second must not reuse the first one's rows."""
    folder = shapes(tmp_path, "few", num_train=2, num_val=1, min_shapes=1, max_shapes=1)
    rewrite_boxes(folder, as_xyxy)
    cache = str(tmp_path / "cache")
    as_given = load_coco_folder_with_info(folder, cache_dir=cache)
    declared = load_coco_folder_with_info(folder, cache_dir=cache, box_format="xyxy")
    corners = np.array([a["bbox"] for a in json.loads((folder / "annotations/instances_train.json").read_text())
                        ["annotations"]])
    np.testing.assert_allclose(rows_boxes(declared)[:, 2:], corners[:, 2:] - corners[:, :2], atol=1e-4)
    assert not np.allclose(rows_boxes(as_given), rows_boxes(declared))


def test_box_format_does_not_apply_to_a_yolo_folder(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path / "yolo", format="yolo", num_train=4, num_val=2, image_size=48)
    with pytest.raises(ValueError, match="--box_format xyxy does not apply to a YOLO folder"):
        inspect(tmp_path, "--yolo_dir", str(tmp_path / "yolo"), "--box_format", "xyxy")


# ----------------------------------------------------------------------------- good data passes


def hub_layout(data, folder: Path) -> Path:
    """``data`` saved with ``objects`` as a list of dicts (``List({...})``, the other Hub layout)."""
    names = data.label_mapping.names
    features = datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"), "objects": datasets.List({
            "bbox": datasets.List(datasets.Value("float32"), length=4), "category": datasets.ClassLabel(names=names)})})

    def to_list(objects):
        return {"objects": [{"bbox": b, "category": c} for b, c in zip(objects["bbox"], objects["category"])]}

    columns = ["image_id", "image", "width", "height", "objects"]
    data.dataset.select_columns(columns).map(to_list, input_columns="objects", features=features).save_to_disk(
        str(folder))
    return folder


@pytest.mark.parametrize("fixture", ["synthetic", "mixed_sizes", "bad_data", "yolo", "saved", "hub_layout"])
def test_the_test_fixtures_pass_without_a_false_alarm(tmp_path: Path, fixture: str) -> None:
    if fixture == "yolo":
        make_synthetic_coco(tmp_path / "yolo", format="yolo", num_train=6, num_val=2, image_size=48, seed=2)
        source = ["--yolo_dir", str(tmp_path / "yolo")]
    elif fixture in ("saved", "hub_layout"):
        data = load_coco_folder_with_info(shapes(tmp_path), cache_dir=str(tmp_path / "c0"))
        folder = tmp_path / fixture
        data.dataset.save_to_disk(str(folder)) if fixture == "saved" else hub_layout(data, folder)
        source = ["--dataset_path", str(folder)]
    else:
        build = {"synthetic": shapes, "mixed_sizes": lambda p: mixed_size_coco(p / "mixed"),
                 "bad_data": lambda p: bad_data_coco(p / "bad")}[fixture]
        source = ["--coco_dir", str(build(tmp_path))]
    report = inspect(tmp_path, *source)
    for summary in report.splits.values():
        assert summary.boxes > 0 and not summary.skipped
        assert sum(summary.boxes_per_class.values()) == summary.boxes
    assert all((tmp_path / "out" / name).is_file() for name in (DATA_PICTURE_FILE, TRAINING_INPUTS_PICTURE_FILE))


def test_the_demo_data_passes_without_a_false_alarm(tmp_path: Path) -> None:
    report = INSPECT["main"](["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")])
    train = report.splits["train"]
    settings = report.settings
    assert (train.images, settings.num_queries, settings.stride) == (SYNTHETIC_DEFAULTS["num_train"], 10, 8)
    assert train.max_boxes == SYNTHETIC_DEFAULTS["max_shapes"] and not train.skipped
    assert train.boxes_under_stride == 0, "the demo's shapes are all larger than its stride-8 cells"


# ----------------------------------------------------------------------------- labels


def test_class_names_that_differ_between_splits_are_an_error_naming_both(tmp_path: Path) -> None:
    data = load_coco_folder_with_info(shapes(tmp_path), cache_dir=str(tmp_path / "c0"))
    names = data.label_mapping.names  # ['N/A_0', 'circle', 'square', 'triangle']
    reordered = [names[0], names[2], names[1], names[3]]
    val = data.dataset["val"].cast_column("objects", {**data.dataset["val"].features["objects"],
                                                      "category": datasets.List(datasets.ClassLabel(names=reordered))})
    datasets.DatasetDict({"train": data.dataset["train"], "val": val}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"split 'val' has the class names \['N/A_0', 'square', 'circle', 'triangle'\] "
                                         r"but the labels \(from split 'train'\) are \['N/A_0', 'circle', 'square', "
                                         r"'triangle'\]"):
        inspect(tmp_path, "--dataset_path", str(tmp_path / "saved"))


def test_fine_tuning_a_model_whose_classes_come_in_another_order_is_an_error(tmp_path: Path) -> None:
    folder = shapes(tmp_path)
    model = tmp_path / "model"
    tiny_config(id2label={0: "square", 1: "circle", 2: "triangle"}).save_pretrained(model)
    with pytest.raises(ValueError, match=r"the dataset has the model's classes under other ids: data \{0: 'circle', "
                                         r"1: 'square', 2: 'triangle'\} vs the model .*model \{0: 'square', "
                                         r"1: 'circle', 2: 'triangle'\}"):
        inspect(tmp_path, "--coco_dir", str(folder), "--contiguous_labels", "--model_name_or_path", str(model))
    tiny_config(id2label={0: "box", 1: "other"}).save_pretrained(model)  # a new label set: its head is replaced
    inspect(tmp_path, "--coco_dir", str(folder), "--contiguous_labels", "--model_name_or_path", str(model))


def saved_model(folder: Path, id2label: dict[int, str]) -> Path:
    DetrCustomForObjectDetection(tiny_config(id2label=id2label)).save_pretrained(folder)
    return folder


def test_evaluation_refuses_other_labels_and_an_empty_split_unless_asked(tmp_path: Path) -> None:
    folder = shapes(tmp_path, num_train=2, num_val=3)
    args = ["--coco_dir", str(folder), "--image_size", "64", "--cache_dir", str(tmp_path / "cache"), "--cpu"]
    swapped = saved_model(tmp_path / "swapped", {0: "N/A", 1: "square", 2: "circle", 3: "triangle"})
    with pytest.raises(ValueError, match=r"the dataset has labels the model names otherwise: data \{1: 'circle', "
                                         r"2: 'square', 3: 'triangle'\} vs the model .*swapped \{1: 'square', "
                                         r"2: 'circle', 3: 'triangle'\}"):
        EVALUATE["main"](["--model", str(swapped), *args])
    fresh_accelerate_state_reset()
    right = saved_model(tmp_path / "right", {0: "N/A", 1: "circle", 2: "square", 3: "triangle"})
    rewrite_boxes(folder, lambda box, image: [0, 0, 0, 0], splits=("val",))  # no usable box left in val
    with pytest.raises(ValueError, match=r"split 'val' has no usable box in its 3 images .*--allow_empty_split"):
        EVALUATE["main"](["--model", str(right), *args])
    fresh_accelerate_state_reset()
    result = EVALUATE["main"](["--model", str(right), *args, "--allow_empty_split"])
    assert result["split"] == "val"


# ----------------------------------------------------------------------------- what would stop a run mid-epoch


def test_an_empty_training_split_is_an_error(tmp_path: Path) -> None:
    folder = shapes(tmp_path)
    rewrite_boxes(folder, lambda box, image: [box[0], box[1], 0, box[3]], splits=("train",))
    with pytest.raises(ValueError, match=r"split 'train' has no usable box in its 20 images \(loader: "
                                         r"\{'images_without_annotations': 20, 'zero_area_boxes_dropped': \d+\}\); "
                                         "a detector cannot learn or be scored on it$"):
        inspect(tmp_path, "--coco_dir", str(folder))


def test_an_image_with_more_boxes_than_queries_stops_training_before_any_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = tiny_run_args(out, tmp_path / "cache", "--synthetic_min_shapes", "3", "--synthetic_max_shapes", "3",
                         "--config_overrides", "num_queries=2")
    with pytest.raises(ValueError, match=r"split 'train': image \d+ \(.*\.png\) has 3 boxes, more than the model's 2 "
                                         r"queries \(num_queries\), and 8 image\(s\) have more than 2; .*"
                                         "--config_overrides num_queries=3"):
        TRAIN["main"](args)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_an_image_no_resize_can_handle_is_skipped_and_counted_and_training_runs(tmp_path: Path) -> None:
    images = [{"file_name": f"g{i}.png", "width": 64, "height": 64, "rects": [(8 + i, 10, 24, 20)]} for i in range(3)]
    images.append({"file_name": "line.png", "width": 1000, "height": 1, "rects": [(100, 0, 50, 1)]})
    anns = [ann(i + 1, i + 1, (8 + i, 10, 24, 20)) for i in range(3)] + [ann(4, 4, (100, 0, 50, 1))]
    write_coco(tmp_path / "coco", "train", images, anns)
    write_coco(tmp_path / "coco", "val", images[:2], anns[:2])
    args = ["--model_config", "tiny", "--coco_dir", str(tmp_path / "coco"), "--image_size", "64", "--cache_dir",
            str(tmp_path / "cache"), "--per_device_train_batch_size", "1", "--num_train_epochs", "1",
            "--backbone_weights", "none", "--picture_images", "0", "--checkpointing_epochs", "0", "--no_augmentation"]
    # without the check, the processor refuses line.png (a resize to 0 x 107 px) when its batch comes up, mid-epoch
    results = TRAIN["main"]([*args, "--output_dir", str(tmp_path / "run")])
    assert results["global_step"] == 3, "the three usable images, one epoch at batch 1"
    report = inspect(tmp_path, "--coco_dir", str(tmp_path / "coco"))
    assert report.splits["train"].skipped == {"resize_to_zero_images": 1} and report.splits["train"].images == 3
    fresh_accelerate_state_reset()
    with pytest.raises(ValueError, match=r"bad data: split 'train': image 4 \(.*line\.png\): 1000x1 px cannot be "
                                         "resized"):
        TRAIN["main"]([*args, "--on_bad_data", "raise", "--output_dir", str(tmp_path / "run2")])


def test_images_past_pils_pixel_limit_after_a_resize_are_skipped(tmp_path: Path, monkeypatch) -> None:
    """A 4000 x 4 image is fine for evaluation at r50's sizes (1333 x 1 px) but DETR's crop branch resizes its short
    side to 600 with no long-side limit: 600,000 x 600 px, past PIL's limit (and gigabytes of memory)."""
    images = [{"file_name": "a.png", "width": 64, "height": 64}, {"file_name": "wide.png", "width": 4000, "height": 4}]
    write_coco(tmp_path / "coco", "train", images, [ann(1, 1, (8, 8, 20, 20)), ann(2, 2, (10, 0, 100, 4))])
    data = load_coco_folder_with_info(tmp_path / "coco", cache_dir=str(tmp_path / "cache"))
    r50 = resolve_options(parse_train_args(["--model_config", "r50", "--coco_dir", "x"]))
    resizes = training_resizes(r50)
    _, report = check_dataset(data, ["train"], CheckSettings(resizes=resizes[:1]))
    assert not report.splits["train"].skipped, "the processor's resize alone is fine"
    checked, report = check_dataset(data, ["train"], CheckSettings(resizes=resizes))
    assert report.splits["train"].skipped == {"too_large_images": 1} and len(checked.dataset["train"]) == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # the stored image itself over the (lowered) limit
    _, report = check_dataset(data, ["train"], CheckSettings())
    assert report.splits["train"].skipped == {"too_large_images": 1}, "4000 x 4 px over 2 x 4000, 64 x 64 under"


# ----------------------------------------------------------------------------- the report


def test_report_counts_boxes_sizes_queries_and_stride_cells(tmp_path: Path) -> None:
    data = load_coco_folder_with_info(mixed_size_coco(tmp_path / "mixed"), cache_dir=str(tmp_path / "cache"))
    # val: a.png 96x64 one 30x20 box, b.png 64x80 boxes 20x30 (other) and 16x16, c.png 72x72 one 40x36 box
    settings = CheckSettings(num_queries=5, stride=32, resizes=((64, 107),))
    _, report = check_dataset(data, ["val"], settings)
    val = report.splits["val"]
    assert (val.images, val.boxes, val.max_boxes, val.images_without_boxes) == (3, 4, 2, 0)
    assert val.boxes_per_class == {"box": 3, "other": 1}
    sizes = sorted([600 ** 0.5, 600 ** 0.5, 16.0, 1440 ** 0.5])
    np.testing.assert_allclose(val.box_sizes, (sizes[0], np.median(sizes), sizes[-1]))
    # at a 64 px short side: a.png and b.png stay as they are (30x20, 20x30, 16x16), c.png x0.889 (40x36 -> 35.6x32)
    assert val.boxes_under_stride == 3, "all but c.png's 40x36 box (35.6x32 px at input size) fit in a 32 px cell"
    line = report.lines()[0]
    assert line.startswith("data val: 3 images (0 without boxes), 4 boxes (box 3, other 1); at most 2 in one image "
                           "(num_queries 5)") and "3 boxes smaller than one stride cell (32 px" in line


# ----------------------------------------------------------------------------- pictures


def extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_training_writes_pictures_whose_boxes_sit_on_the_objects(tmp_path: Path) -> None:
    """A white square on black, labelled: in both pictures the label-coloured outline surrounds the square, as
    stored and after the train transforms (flip, resize, crop), drawn by drawing.py with the class name."""
    images = [{"file_name": "s.png", "width": 64, "height": 48, "rects": []}]
    write_coco(tmp_path / "coco", "train", images * 2, [ann(1, 1, (6, 10, 36, 30))])
    write_coco(tmp_path / "coco", "val", images, [ann(1, 1, (6, 10, 36, 30))])
    square = Image.new("RGB", (64, 48), (0, 0, 0))
    square.paste((255, 255, 255), (6, 10, 42, 40))
    square.save(tmp_path / "coco" / "images" / "train" / "s.png")
    out = tmp_path / "run"
    TRAIN["main"](["--model_config", "tiny", "--coco_dir", str(tmp_path / "coco"), "--image_size", "64",
                   "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "1",
                   "--per_device_train_batch_size", "1", "--picture_images", "1", "--seed", "3"])
    colour = np.array(label_colour(1))  # category 1, "box"
    for name in (DATA_PICTURE_FILE, TRAINING_INPUTS_PICTURE_FILE):
        pixels = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        tile = pixels[:-LEGEND_ROW_HEIGHT]  # one image, one legend row under it
        white = extent((tile > 128).all(axis=-1))  # half-way up the edges a resize blurs
        drawn = extent((np.abs(tile - colour) <= 2).all(axis=-1))
        slack = 0.03 * tile.shape[1]  # a pixel or so of the image, upscaled into the sheet
        for side in (0, 2, 3):  # left, right, bottom (the tag with the class name sits on the top edge)
            assert abs(drawn[side] - white[side]) <= slack, (name, drawn, white)
