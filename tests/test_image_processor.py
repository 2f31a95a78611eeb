"""Tests of DetrCustomImageProcessor: parity with transformers' DetrImageProcessor, box round trip, input types,
errors, a huge image, save/load, devices and post-processing. Small images and a small `size` keep it fast.

Measured tolerances (pixel_values after ImageNet normalisation, uint8 inputs, torch 2.15 / transformers 5.23, CPU):
* vs transformers' torchvision backend: max |diff| 4.8e-7 (the same uint8 antialias kernel; only the float rounding
  of the fused rescale + normalise differs) -> tolerance TOL_TORCHVISION = 1e-5;
* vs transformers' PIL backend: max |diff| 0.0175 = one uint8 level (1 / 255 / std_blue = 0.0174) in a few pixels
  when upsampling (PIL and PyTorch's uint8 kernel round a few pixels differently; mean |diff| 5e-5); identical to
  5e-7 when downsampling -> TOL_ONE_LEVEL = 0.02;
* our float32 path (float inputs, and every image on a GPU) vs our CPU uint8 path: max 0.0175, one uint8 level
  (the uint8 kernel rounds its result and uses fixed-point weights) -> TOL_ONE_LEVEL.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from transformers.image_transforms import get_size_with_aspect_ratio as hf_get_size_with_aspect_ratio

from modeling_detr_custom import image_processing_detr_custom as image_processing
from modeling_detr_custom.image_processing_detr_custom import (
    DetrCustomImageProcessor,
    get_size_with_aspect_ratio,
)

TOL_TORCHVISION = 1e-5
TOL_ONE_LEVEL = 0.02
SMALL = {"shortest_edge": 100, "longest_edge": 160}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 (H, W, 3): smooth gradients, a disc, a rectangle and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            128 + 100 * np.sin(x / width * 3 + seed),
            128 + 100 * np.cos(y / height * 2),
            128 + 80 * np.sin((x + y) / (height + width) * 5),
        ],
        axis=-1,
    )
    image[(y - height / 2) ** 2 + (x - width / 3) ** 2 < (min(height, width) / 4) ** 2] = [250, 30, 40]
    image[height // 5 : height // 2, width // 2 : width * 4 // 5] = [20, 200, 60]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def coco(image_id: int, *objects: tuple) -> dict:
    """COCO detection annotation from (x, y, w, h, category_id[, iscrowd]) tuples."""
    annotations = []
    for x, y, w, h, category_id, *crowd in objects:
        iscrowd = crowd[0] if crowd else 0
        annotation = {"bbox": [x, y, w, h], "category_id": category_id, "area": float(w * h), "iscrowd": iscrowd}
        annotations.append(annotation)
    return {"image_id": image_id, "annotations": annotations}


@pytest.fixture(scope="module")
def hf_processors() -> dict:
    return {
        "torchvision": transformers.DetrImageProcessor(size=SMALL),
        "pil": transformers.DetrImageProcessorPil(size=SMALL),
    }


# --------------------------------------------------------------------------------------------------------------
# parity with transformers
# --------------------------------------------------------------------------------------------------------------
def test_output_size_rounding_matches_transformers():
    for height in range(1, 400, 7):
        for width in range(1, 700, 11):
            for size, max_size in ((800, 1333), (100, 160), (100, None)):
                expected = hf_get_size_with_aspect_ratio((height, width), size, max_size)
                assert get_size_with_aspect_ratio((height, width), size, max_size) == expected, (height, width)


SHAPES = [(60, 80), (200, 300), (150, 100), (123, 457), (99, 101), (100, 160), (64, 64)]


@pytest.mark.parametrize("backend, tolerance", [("torchvision", TOL_TORCHVISION), ("pil", TOL_ONE_LEVEL)])
def test_pixels_match_transformers_single_images(hf_processors, backend, tolerance):
    ours = DetrCustomImageProcessor(size=SMALL)
    for seed, (height, width) in enumerate(SHAPES):
        image = PIL.Image.fromarray(photo(height, width, seed))
        mine = ours(image)
        theirs = hf_processors[backend](image, return_tensors="pt")
        assert mine["pixel_values"].shape == theirs["pixel_values"].shape
        assert mine["pixel_values"].dtype == torch.float32
        assert torch.equal(mine["pixel_mask"], theirs["pixel_mask"])
        assert (mine["pixel_values"] - theirs["pixel_values"]).abs().max() <= tolerance, (height, width)


def test_default_size_matches_transformers_800():
    image = PIL.Image.fromarray(photo(60, 80))  # upsampled to 800 x 1066
    mine = DetrCustomImageProcessor()(image)
    theirs = transformers.DetrImageProcessor()(image, return_tensors="pt")
    assert mine["pixel_values"].shape == theirs["pixel_values"].shape == (1, 3, 800, 1066)
    assert (mine["pixel_values"] - theirs["pixel_values"]).abs().max() <= TOL_TORCHVISION


@pytest.mark.parametrize("backend, tolerance", [("torchvision", TOL_TORCHVISION), ("pil", TOL_ONE_LEVEL)])
def test_padded_batch_matches_transformers(hf_processors, backend, tolerance):
    images = [PIL.Image.fromarray(photo(h, w, seed)) for seed, (h, w) in enumerate(SHAPES[:4])]
    mine = DetrCustomImageProcessor(size=SMALL)(images)
    theirs = hf_processors[backend](images, return_tensors="pt")
    assert mine["pixel_values"].shape == theirs["pixel_values"].shape
    assert mine["pixel_mask"].dtype == torch.int64
    assert torch.equal(mine["pixel_mask"], theirs["pixel_mask"])
    assert (mine["pixel_values"] - theirs["pixel_values"]).abs().max() <= tolerance


ANNOTATED = [
    (photo(60, 80, 0), coco(7, (10, 5, 30, 20, 3), (70.5, 50, 30, 20, 1), (90, 5, 30, 20, 1), (1, 1, 3, 3, 2, 1))),
    (photo(200, 300, 1), coco(8, (100.5, 50.25, 60, 70, 5), (0, 0, 300, 200, 4), (-10, -10, 40, 30, 2))),
    (photo(150, 100, 2), coco(9)),
]


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_labels_identical_for_unpadded_single_images(hf_processors, backend):
    ours = DetrCustomImageProcessor(size=SMALL)
    for image, annotation in ANNOTATED:
        mine = ours(image, annotations=annotation)["labels"][0]
        theirs = hf_processors[backend](image, annotations=annotation, return_tensors="pt")["labels"][0]
        assert set(mine) == set(theirs)
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype, key
            assert torch.equal(mine[key], theirs[key]), key


def test_padded_batch_boxes_normalised_by_unpadded_size(hf_processors):
    """Documented difference: ours normalise by each image's unpadded size (original DETR), transformers by the
    padded canvas, so ours * unpadded size == theirs * padded size. Their `size` is the padded size, ours the
    unpadded one; every other key is identical."""
    images, annotations = [a[0] for a in ANNOTATED], [a[1] for a in ANNOTATED]
    mine = DetrCustomImageProcessor(size=SMALL)(images, annotations=annotations)
    theirs = hf_processors["torchvision"](images, annotations=annotations, return_tensors="pt")
    padded_h, padded_w = mine["pixel_values"].shape[-2:]
    for m, t in zip(mine["labels"], theirs["labels"]):
        h, w = m["size"].tolist()
        ours_pixels = m["boxes"] * torch.tensor([w, h, w, h])
        theirs_pixels = t["boxes"] * torch.tensor([padded_w, padded_h, padded_w, padded_h])
        torch.testing.assert_close(ours_pixels, theirs_pixels, atol=1e-4, rtol=1e-5)
        assert t["size"].tolist() == [padded_h, padded_w]
        for key in ("class_labels", "area", "iscrowd", "orig_size", "image_id"):
            assert torch.equal(m[key], t[key]), key
        assert (m["boxes"] >= 0).all() and (m["boxes"] <= 1).all()


# --------------------------------------------------------------------------------------------------------------
# boxes: crowd, clipping, empty boxes, round trip
# --------------------------------------------------------------------------------------------------------------
def test_crowd_removed_clipped_and_empty_boxes_dropped_and_counted(caplog):
    image, annotation = ANNOTATED[0]  # 80 x 60: one box beyond the right edge (empty after clipping), one crowd
    processor = DetrCustomImageProcessor(size=SMALL)
    with caplog.at_level(logging.WARNING):
        labels = processor(image, annotations=annotation)["labels"][0]
    assert labels["class_labels"].tolist() == [3, 1]
    assert processor.last_num_dropped_boxes == [1]
    assert "Dropped 1 box(es)" in caplog.text
    # the second box is clipped at the right/bottom edges: x1 = 80, y1 = 60 -> in normalised units 1.0
    cx, cy, w, h = labels["boxes"][1].tolist()
    assert cx + w / 2 == pytest.approx(1.0) and cy + h / 2 == pytest.approx(1.0)

    kept = DetrCustomImageProcessor(size=SMALL, remove_crowd=False)(image, annotations=annotation)["labels"][0]
    assert kept["class_labels"].tolist() == [3, 1, 2] and kept["iscrowd"].tolist() == [0, 0, 1]


def test_box_round_trip_through_resize_pad_and_post_processing():
    """A box drawn on an image is where the labels say after resize + pad, and post-processing the labels as if
    they were predictions gives the drawn box back in original pixels (within one pixel)."""
    drawn = [(17, 12, 61, 47), (30, 80, 95, 140)]  # (x0, y0, x1, y1) exclusive end, original pixels
    shapes = [(90, 120), (150, 100)]
    images, annotations = [], []
    for i, ((h, w), (x0, y0, x1, y1)) in enumerate(zip(shapes, drawn)):
        image = np.full((h, w, 3), 40, dtype=np.uint8)
        image[y0:y1, x0:x1] = (255, 0, 0)
        images.append(image)
        annotations.append(coco(i, (x0, y0, x1 - x0, y1 - y0, 1)))
    batch = DetrCustomImageProcessor(size=SMALL)(images, annotations=annotations)
    assert batch["pixel_values"].shape == (2, 3, 150, 133)  # 100x133 and 150x100, padded together

    for i, labels in enumerate(batch["labels"]):
        h, w = labels["size"].tolist()
        assert batch["pixel_mask"][i].sum() == h * w
        red = batch["pixel_values"][i, 0] * STD[0] + MEAN[0]  # back to [0, 1]
        ys, xs = torch.nonzero(red > 0.6, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        cx, cy, bw, bh = (labels["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        expected = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        assert (found - expected).abs().max() <= 1.0, (i, found, expected)

    num_queries, num_classes = 5, 3
    logits = torch.full((2, num_queries, num_classes + 1), -10.0)
    logits[..., -1] = 10.0  # "no object" everywhere ...
    pred_boxes = torch.rand(2, num_queries, 4) * 0.5 + 0.25
    for i, labels in enumerate(batch["labels"]):
        logits[i, 2] = -10.0
        logits[i, 2, labels["class_labels"][0]] = 10.0  # ... except query 2, which predicts the drawn box
        pred_boxes[i, 2] = labels["boxes"][0]
    outputs = SimpleNamespace(logits=logits, pred_boxes=pred_boxes)
    results = DetrCustomImageProcessor().post_process_object_detection(outputs, 0.5, [s for s in shapes])
    for result, box in zip(results, drawn):
        assert result["labels"].tolist() == [1]
        assert (result["boxes"][0] - torch.tensor(box, dtype=torch.float32)).abs().max() <= 1.0


# --------------------------------------------------------------------------------------------------------------
# input types
# --------------------------------------------------------------------------------------------------------------
def test_pil_numpy_and_torch_inputs_agree():
    array = photo(70, 90)
    processor = DetrCustomImageProcessor(size=SMALL)
    reference = processor(PIL.Image.fromarray(array))["pixel_values"]
    chw_view = torch.from_numpy(array).permute(2, 0, 1)
    for image in (array, chw_view, chw_view.contiguous()):
        assert torch.equal(processor(image)["pixel_values"], reference)
    # float inputs are taken to be in [0, 1]; resized in float32 -> within one uint8 level
    for image in (array.astype(np.float32) / 255, torch.from_numpy(array).permute(2, 0, 1).double() / 255):
        assert (processor(image)["pixel_values"] - reference).abs().max() <= TOL_ONE_LEVEL
    both = processor([array, torch.from_numpy(array).permute(2, 0, 1)])["pixel_values"]
    assert torch.equal(both, reference.expand(2, -1, -1, -1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK"])
def test_pil_modes_become_rgb(mode):
    rgb = PIL.Image.fromarray(photo(50, 70))
    image = rgb.convert(mode)
    processor = DetrCustomImageProcessor(size=SMALL)
    out = processor(image)["pixel_values"]
    assert out.shape == (1, 3, 100, 140)
    assert torch.equal(out, processor(image.convert("RGB"))["pixel_values"])


def test_grayscale_and_rgba_arrays():
    gray = photo(50, 70)[..., 0]
    processor = DetrCustomImageProcessor(size=SMALL)
    expected = processor(np.stack([gray] * 3, -1))["pixel_values"]
    assert torch.equal(processor(gray)["pixel_values"], expected)
    assert torch.equal(processor(gray[..., None])["pixel_values"], expected)
    assert torch.equal(processor(torch.from_numpy(gray)[None])["pixel_values"], expected)
    rgba = np.concatenate([np.stack([gray] * 3, -1), np.full((50, 70, 1), 7, np.uint8)], -1)
    assert torch.equal(processor(rgba)["pixel_values"], expected)  # alpha dropped, as PIL's convert("RGB")


def test_exif_orientation_applied():
    array = photo(40, 60)
    image = PIL.Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # stored 60 wide x 40 high, displayed rotated by 90 degrees
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    loaded = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    processor = DetrCustomImageProcessor(size=SMALL)
    out = processor(loaded, annotations=coco(1, (1, 2, 3, 4, 0)))
    upright = PIL.ImageOps.exif_transpose(loaded)
    assert upright.size == (40, 60)
    assert out["labels"][0]["orig_size"].tolist() == [60, 40]
    assert torch.equal(out["pixel_values"], processor(upright)["pixel_values"])


def test_return_numpy_and_device_cpu():
    images = [photo(50, 70), photo(80, 60, 1)]
    annotations = [coco(0, (1, 2, 10, 10, 1)), coco(1)]
    processor = DetrCustomImageProcessor(size=SMALL)
    default = processor(images, annotations=annotations)
    on_cpu = processor(images, annotations=annotations, device="cpu")
    assert on_cpu["pixel_values"].device.type == "cpu"
    assert torch.equal(on_cpu["pixel_values"], default["pixel_values"])
    as_numpy = processor(images, annotations=annotations, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["pixel_mask"].dtype == np.int64
    assert isinstance(as_numpy["labels"][0]["boxes"], np.ndarray)
    np.testing.assert_array_equal(as_numpy["pixel_values"], default["pixel_values"].numpy())


def test_float32_resize_path_used_on_gpus_matches_cpu_uint8_path(monkeypatch):
    """On a GPU every image is resized in float32; emulate that path on CPU to check it without a GPU."""
    images = [PIL.Image.fromarray(photo(h, w, seed)) for seed, (h, w) in enumerate(SHAPES)]
    processor = DetrCustomImageProcessor(size=SMALL)
    uint8_path = processor(images)["pixel_values"]
    monkeypatch.setattr(image_processing, "_resize_in_uint8", lambda image: False)
    float_path = processor(images)["pixel_values"]
    assert float_path.shape == uint8_path.shape
    assert 0 < (float_path - uint8_path).abs().max() <= TOL_ONE_LEVEL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images = [PIL.Image.fromarray(photo(h, w, seed)) for seed, (h, w) in enumerate(SHAPES)]
    annotations = [coco(i, (5, 5, 20, 10, 1)) for i in range(len(images))]
    processor = DetrCustomImageProcessor(size=SMALL)
    cpu = processor(images, annotations=annotations, device="cpu")
    gpu = processor(images, annotations=annotations, device="cuda")
    assert gpu["pixel_values"].device.type == "cuda" and gpu["labels"][0]["boxes"].device.type == "cuda"
    assert torch.equal(gpu["pixel_mask"].cpu(), cpu["pixel_mask"])
    # the GPU resizes in float32, the CPU in uint8: one uint8 level apart at most
    assert (gpu["pixel_values"].cpu() - cpu["pixel_values"]).abs().max() <= TOL_ONE_LEVEL
    for g, c in zip(gpu["labels"], cpu["labels"]):
        for key in c:
            assert torch.equal(g[key].cpu(), c[key]), key
    big = processor(torch.zeros(3, 9000, 12000, dtype=torch.uint8), device="cuda")
    assert big["pixel_values"].shape == (1, 3, 100, 133)


# --------------------------------------------------------------------------------------------------------------
# sizes and padding options
# --------------------------------------------------------------------------------------------------------------
def test_fixed_pad_size_and_no_padding():
    images = [photo(50, 70), photo(80, 60, 1)]
    out = DetrCustomImageProcessor(size=SMALL, pad_size={"height": 200, "width": 210})(images)
    assert out["pixel_values"].shape == (2, 3, 200, 210)
    assert out["pixel_mask"][0].sum() == 100 * 140 and out["pixel_mask"][1].sum() == 133 * 100
    assert (out["pixel_values"][0, :, 100:, :] == 0).all() and (out["pixel_values"][0, :, :, 140:] == 0).all()
    with pytest.raises(ValueError, match=r"images\[1\] is 133x100 .* larger than pad_size"):
        DetrCustomImageProcessor(size=SMALL, pad_size={"height": 120, "width": 210})(images)
    fixed = DetrCustomImageProcessor(size={"height": 64, "width": 48}, do_pad=False)(images)
    assert fixed["pixel_values"].shape == (2, 3, 64, 48) and bool(fixed["pixel_mask"].all())
    with pytest.raises(ValueError, match="do_pad=False"):
        DetrCustomImageProcessor(size=SMALL, do_pad=False)(images)


def test_a_pad_size_smaller_than_the_resize_size_is_refused_where_it_is_set(tmp_path):
    landscape = {"shortest_edge": 48, "longest_edge": 80}
    message = (r"^pad_size = \{'height': 40, 'width': 80\} is smaller than the resize size of size = "
               r"\{'shortest_edge': 48, 'longest_edge': 80\}: up to 48x80 or 80x48 \(height x width\)")
    with pytest.raises(ValueError, match=message):
        DetrCustomImageProcessor(size=landscape, pad_size={"height": 40, "width": 80})
    with pytest.raises(ValueError, match=r"pad_size = \{'height': 800, 'width': 1300\} is smaller than the resize "
                                         r"size of size = \{'shortest_edge': 800, 'longest_edge': 1333\}"):
        DetrCustomImageProcessor(pad_size={"height": 800, "width": 1300})  # DETR's default size
    with pytest.raises(ValueError, match=r"resize size of size = \{'height': 64, 'width': 48\}: up to 64x48"):
        DetrCustomImageProcessor(size={"height": 64, "width": 48}, pad_size={"height": 64, "width": 40})
    with pytest.raises(ValueError, match=r"resize size of size = \{'shortest_edge': 64\}: up to 64x64"):
        DetrCustomImageProcessor(size=64, pad_size={"height": 60, "width": 1000})
    # from_dict / from_pretrained: a saved processor whose JSON was edited
    DetrCustomImageProcessor(size=landscape, pad_size={"height": 48, "width": 80}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    saved["pad_size"] = {"height": 40, "width": 80}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"^pad_size = \{'height': 40, 'width': 80\} is smaller than the resize size "
                                         r"of size = \{.*\}: up to 48x80 or 80x48"):  # JSON sorts the keys
        DetrCustomImageProcessor.from_pretrained(tmp_path)
    # set: the attribute keeps its value
    processor = DetrCustomImageProcessor(size=landscape, pad_size={"height": 48, "width": 80})
    with pytest.raises(ValueError, match=message):
        processor.pad_size = {"height": 40, "width": 80}
    with pytest.raises(ValueError, match=r"pad_size = \{'height': 48, 'width': 80\} is smaller .* size = "
                                         r"\{'shortest_edge': 100, 'longest_edge': 160\}"):
        processor.size = SMALL
    assert processor.pad_size == {"height": 48, "width": 80} and processor.size == landscape
    # what holds the resized images of one orientation is accepted, and pad_size means nothing without a resize
    assert DetrCustomImageProcessor(size=landscape, pad_size={"height": 80, "width": 48}).pad_size["height"] == 80
    unresized = DetrCustomImageProcessor(size=landscape, do_resize=False, pad_size={"height": 40, "width": 40})
    with pytest.raises(ValueError, match=r"pad_size = \{'height': 40, 'width': 40\} is smaller"):
        unresized.do_resize = True
    processor.pad_size = None
    processor.size = SMALL
    assert processor.size == SMALL


def test_no_resize_no_normalise():
    array = photo(30, 40)
    out = DetrCustomImageProcessor(do_resize=False, do_normalize=False)(array)["pixel_values"][0]
    torch.testing.assert_close(out, torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def _memory_mb(key: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB (Linux)."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{key}:\s+(\d+)", status.read()).group(1)) // 1024


def _reset_peak_memory() -> bool:
    """Linux lets a process reset its peak resident memory (VmHWM) by writing 5 to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def test_huge_image_resizes_quickly_without_float_copy():
    """12000 x 9000 uint8 is resized in uint8 on CPU: no float32 (1.3 GB) or float64 (2.6 GB) copy of it."""
    image = np.full((9000, 12000, 3), 7, np.uint8)  # 324 MB, touched so that it is resident
    processor = DetrCustomImageProcessor()
    measure_memory = _reset_peak_memory()
    before = _memory_mb("VmRSS") if measure_memory else 0
    start = time.perf_counter()
    out = processor(image)
    seconds = time.perf_counter() - start
    assert out["pixel_values"].shape == (1, 3, 800, 1066)
    assert out["pixel_values"][0].flatten(1).std(1).max() < 1e-5  # a constant image stays constant per channel
    assert seconds < 10
    if measure_memory:  # measured: + 40 MB (the output); a float32 copy would add 1240 MB
        assert _memory_mb("VmHWM") - before < 300


# --------------------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------------------
GOOD = photo(30, 40)


@pytest.mark.parametrize(
    "images, annotations, kwargs, message",
    [
        ([], None, {}, "images is empty"),
        ([GOOD, np.zeros((0, 10, 3), np.uint8)], None, {}, r"images\[1\] has size 0x10"),
        ([GOOD, PIL.Image.new("RGB", (5, 0))], None, {}, r"images\[1\] has size 0x5"),
        ([GOOD, GOOD], [coco(0)], {}, "2 images but 1 annotations"),
        (
            [GOOD, GOOD],
            [coco(0), coco(1, (1, 2, -5, 4, 1))],
            {},
            r"annotations\[1\]\['annotations'\]\[0\]\['bbox'\] = \[1, 2, -5, 4\] has a negative width",
        ),
        (
            [GOOD],
            [{"image_id": 0, "annotations": [{"bbox": [1, 2, 3], "category_id": 1}]}],
            {},
            r"annotations\[0\]\['annotations'\]\[0\]\['bbox'\] = \[1, 2, 3\]; expected four",
        ),
        (
            [GOOD],
            [{"image_id": 0, "annotations": [{"bbox": [1, 2, "a", 4], "category_id": 1}]}],
            {},
            r"\['bbox'\] = \[1, 2, 'a', 4\]",
        ),
        (
            [GOOD, GOOD],
            [coco(0, (1, 2, 3, 4, 1)), coco(1, (1, 2, 3, 4, 1), (1, 2, 3, 4, 7))],
            {"id2label": {0: "a", 1: "b"}},
            r"annotations\[1\]\['annotations'\]\[1\]\['category_id'\] = 7 is not in id2label",
        ),
        (
            [GOOD, GOOD, "cat.jpg"],
            None,
            {},
            re.escape(
                "images[2] is a <class 'str'>; "
                "expected a PIL.Image, a numpy array (H, W, C) or a torch tensor (C, H, W)"
            ),
        ),
        ([{"pixel_values": GOOD}], None, {}, re.escape("images[0] is a <class 'dict'>")),
        ([GOOD, np.zeros((30, 40, 3), np.int32)], None, {}, r"images\[1\] has dtype int32; expected uint8"),
        ([torch.zeros(3, 30, 40, dtype=torch.int64)], None, {}, r"images\[0\] has dtype torch.int64; expected"),
        ([GOOD, np.array([["a"]])], None, {}, r"images\[1\] has dtype <U1"),
        ([GOOD, np.zeros((30, 40, 2), np.uint8)], None, {}, r"images\[1\] has shape \(30, 40, 2\)"),
    ],
)
def test_bad_inputs_raise_value_error_naming_index_and_value(images, annotations, kwargs, message):
    processor = DetrCustomImageProcessor(size=SMALL)
    with pytest.raises(ValueError, match=message):
        processor(images, annotations=annotations, **kwargs)


def test_id2label_from_init_is_checked():
    processor = DetrCustomImageProcessor(size=SMALL, id2label={"1": "cat"})  # string keys, as after JSON
    processor(GOOD, annotations=coco(0, (1, 2, 3, 4, 1)))
    with pytest.raises(ValueError, match=r"\['category_id'\] = 2 is not in id2label \(ids \[1\]\)"):
        processor(GOOD, annotations=coco(0, (1, 2, 3, 4, 2)))


def test_an_image_whose_resize_has_a_side_of_0_px_is_refused_naming_its_size():
    processor = DetrCustomImageProcessor(size=SMALL)
    with pytest.raises(ValueError, match=re.escape(
            "images[1] is 1000x1 (height x width): resizing it to size = {'shortest_edge': 100, 'longest_edge': 160} "
            "gives 160x0, a side of 0 px")):
        processor([GOOD, PIL.Image.new("RGB", (1, 1000))])
    with pytest.raises(ValueError, match=r"images\[0\] is 1x5000 .* gives 0x1333, a side of 0 px"):
        DetrCustomImageProcessor()(torch.zeros(3, 1, 5000, dtype=torch.uint8))  # DETR's default size
    assert processor(PIL.Image.new("RGB", (1, 100)))["pixel_values"].shape == (1, 3, 160, 2)  # less elongated: kept


def test_an_image_over_the_pixel_limit_as_given_or_resized_is_refused_naming_its_size(monkeypatch):
    assert image_processing.max_image_pixels() == 2 * PIL.Image.MAX_IMAGE_PIXELS == 178_956_970
    # resized: a panorama at a shortest edge without a longest edge would need an 800 x 1,200,000 canvas (3.8 GB)
    with pytest.raises(ValueError, match=re.escape(
            "images[0] is 2x3000 (height x width), 800x1200000 resized: more than the 178956970 pixels an image may "
            "have (PIL's decompression-bomb limit")):
        DetrCustomImageProcessor(size={"shortest_edge": 800})(np.zeros((2, 3000, 3), np.uint8))
    # as given: the limit follows PIL's setting
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 600)
    with pytest.raises(ValueError, match=re.escape("images[0] is 30x40 (height x width), 100x133 resized: more than "
                                                   "the 1200 pixels")):
        DetrCustomImageProcessor(size=SMALL)(GOOD)
    with pytest.raises(ValueError, match=re.escape("images[0] is 30x41 (height x width): more than the 1200 pixels")):
        DetrCustomImageProcessor(do_resize=False)(photo(30, 41))
    assert DetrCustomImageProcessor(do_resize=False)(GOOD)["pixel_values"].shape == (1, 3, 30, 40)  # 1200 px
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # PIL's check off: ours too
    assert DetrCustomImageProcessor(size=SMALL)(GOOD)["pixel_values"].shape == (1, 3, 100, 133)


# --------------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path):
    processor = DetrCustomImageProcessor(
        size={"shortest_edge": 512, "longest_edge": 900},
        do_rescale=True,
        do_normalize=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        do_pad=True,
        pad_size={"height": 960, "width": 960},
        remove_crowd=False,
        id2label={0: "cat", 3: "dog"},
    )
    processor(GOOD, annotations=coco(0, (1, 2, 3, 4, 3)))  # per-call statistics must not be saved
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 512, "longest_edge": 900}
    assert "last_num_dropped_boxes" not in saved
    loaded = DetrCustomImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.id2label == {0: "cat", 3: "dog"}
    assert loaded.pad_size == {"height": 960, "width": 960} and loaded.remove_crowd is False
    overridden = DetrCustomImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 100, "longest_edge": 160})
    assert overridden.size == SMALL
    assert DetrCustomImageProcessor.from_pretrained(tmp_path, remove_crowd=True).remove_crowd is True


def test_loads_through_auto_image_processor_as_remote_code(tmp_path, monkeypatch):
    monkeypatch.setattr(DetrCustomImageProcessor, "_auto_class", "AutoImageProcessor")  # restored afterwards
    DetrCustomImageProcessor(size=SMALL, id2label={1: "cat"}).save_pretrained(tmp_path)
    assert (tmp_path / "image_processing_detr_custom.py").is_file()
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_detr_custom.DetrCustomImageProcessor"}
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "DetrCustomImageProcessor"  # names, not classes: the module may be a copy
    assert loaded.size == SMALL and loaded.id2label == {1: "cat"}
    labels = loaded(GOOD, annotations=coco(0, (1, 2, 3, 4, 1)))["labels"][0]
    assert labels["class_labels"].tolist() == [1]


def test_defaults_are_detr():
    processor = DetrCustomImageProcessor()
    assert processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    assert processor.image_mean == [0.485, 0.456, 0.406] and processor.image_std == [0.229, 0.224, 0.225]
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert processor.do_resize and processor.do_rescale and processor.do_normalize and processor.do_pad
    assert processor.remove_crowd and processor.pad_size is None and processor.id2label is None
    assert processor.model_input_names == ["pixel_values", "pixel_mask"]


# --------------------------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------------------------
def make_outputs() -> SimpleNamespace:
    logits = torch.tensor(
        [
            [[5.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 6.0], [0.0, 3.0, 0.0]],
            [[0.0, 0.0, 9.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )  # (B=2, Q=4, C+1=3): the last column is "no object"
    pred_boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.2, 0.4], [0.9, 0.1, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]],
            [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]],
        ]
    )
    return SimpleNamespace(logits=logits, pred_boxes=pred_boxes)


def test_post_process_like_the_pipeline_calls_it():
    outputs = make_outputs()
    processor = DetrCustomImageProcessor()
    # pipeline: post_process_object_detection(outputs, threshold, target_sizes) with an int tensor [[h, w]]
    results = processor.post_process_object_detection(outputs, 0.5, torch.tensor([[100, 200], [50, 40]]))
    assert len(results) == 2 and set(results[0]) == {"scores", "labels", "boxes"}
    first = results[0]
    assert first["labels"].tolist() == [0, 1, 1] and first["labels"].dtype == torch.int64
    probs = outputs.logits[0].softmax(-1)
    torch.testing.assert_close(first["scores"], probs[[0, 1, 3], :-1].max(-1).values)
    torch.testing.assert_close(first["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    torch.testing.assert_close(first["boxes"][1], torch.tensor([140.0, 0.0, 200.0, 30.0]))  # clipped to the image
    torch.testing.assert_close(first["boxes"][2], torch.tensor([0.0, 50.0, 100.0, 100.0]))
    assert results[1]["labels"].tolist() == [1, 0]


def test_post_process_options():
    outputs = make_outputs()
    processor = DetrCustomImageProcessor()
    normalised = processor.post_process_object_detection(outputs, threshold=0.5)
    torch.testing.assert_close(normalised[0]["boxes"][0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert (normalised[0]["boxes"] >= 0).all() and (normalised[0]["boxes"] <= 1).all()
    as_list = processor.post_process_object_detection(outputs, 0.5, [(100, 200), (50, 40)])
    as_tensor = processor.post_process_object_detection(outputs, 0.5, torch.tensor([[100.0, 200.0], [50.0, 40.0]]))
    for a, b in zip(as_list, as_tensor):
        for key in a:
            assert torch.equal(a[key], b[key])
    top = processor.post_process_object_detection(outputs, threshold=0.0, top_k=2)
    assert [len(r["scores"]) for r in top] == [2, 2]
    assert top[0]["scores"][0] >= top[0]["scores"][1]
    assert top[0]["scores"][0] == outputs.logits[0].softmax(-1)[:, :-1].max()
    everything = processor.post_process_object_detection(outputs, threshold=0.0)
    assert [len(r["scores"]) for r in everything] == [4, 4]
    with pytest.raises(ValueError, match=r"target_sizes has shape \(1, 2\); expected \(2, 2\)"):
        processor.post_process_object_detection(outputs, 0.5, [(100, 200)])


def test_post_process_threshold_outside_0_1_or_nan_is_refused_naming_it():
    outputs, processor = make_outputs(), DetrCustomImageProcessor()
    for threshold in (1.5, -0.1, float("nan"), "0.5", None, torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match=rf"^threshold = {re.escape(repr(threshold))}; expected a number in "
                                             r"\[0, 1\]"):
            processor.post_process_object_detection(outputs, threshold=threshold)
    # the bounds are thresholds, as are numpy and torch scalars
    assert [len(r["scores"]) for r in processor.post_process_object_detection(outputs, 0)] == [4, 4]
    assert [len(r["scores"]) for r in processor.post_process_object_detection(outputs, 1)] == [0, 0]
    for threshold in (np.float32(0.5), torch.tensor(0.5)):
        assert [len(r["scores"]) for r in processor.post_process_object_detection(outputs, threshold)] == [3, 2]


@pytest.mark.parametrize("wrap", ["attributes", "dict", "tuple", "list"])
def test_post_process_takes_numpy_outputs_as_onnxruntime_returns_them(wrap):
    outputs = make_outputs()
    processor = DetrCustomImageProcessor()
    sizes = [(100, 200), (50, 40)]
    expected = processor.post_process_object_detection(outputs, 0.5, sizes, top_k=3)
    logits, pred_boxes = outputs.logits.numpy(), outputs.pred_boxes.numpy()
    given = {"attributes": SimpleNamespace(logits=logits, pred_boxes=pred_boxes),
             "dict": {"logits": logits, "pred_boxes": pred_boxes},
             "tuple": (logits, pred_boxes), "list": [logits, pred_boxes]}[wrap]
    found = processor.post_process_object_detection(given, 0.5, np.array(sizes), top_k=3)
    assert [len(r["scores"]) for r in found] == [3, 2]
    for f, e in zip(found, expected):
        assert set(f) == set(e)
        for key in e:
            assert f[key].dtype == e[key].dtype and torch.equal(f[key], e[key])


@pytest.mark.parametrize("outputs, message", [
    ((np.zeros((1, 2, 3)),), r"outputs is a tuple; expected model outputs with `logits` and `pred_boxes`"),
    ({"logits": np.zeros((1, 2, 3))}, r"outputs is a dict; expected"),
    ({"logits": [[[0.0, 1.0]]], "pred_boxes": np.zeros((1, 1, 4))}, r"outputs logits is a list; expected a torch"),
])
def test_post_process_rejects_outputs_it_cannot_read(outputs, message):
    with pytest.raises(ValueError, match=message):
        DetrCustomImageProcessor().post_process_object_detection(outputs)


def test_quick_enough():
    """Guard against an accidental slow path (e.g. a per-pixel Python loop): 4 VGA images well under a second."""
    images = [PIL.Image.fromarray(photo(480, 640, seed)) for seed in range(4)]
    processor = DetrCustomImageProcessor()
    processor(images)
    start = time.perf_counter()
    out = processor(images)
    assert out["pixel_values"].shape == (4, 3, 800, 1066)
    assert time.perf_counter() - start < 5.0
