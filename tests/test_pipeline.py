"""pipeline("object-detection") over our model: from a folder with remote code and from objects,
equal to processor -> model -> post-processing by hand, on a real photograph and on batches."""

import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image
from transformers import pipeline

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor

PHOTO = ROOT / "tests" / "data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "detr-tiny"
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(tiny_config()).eval()
    processor = DetrCustomImageProcessor(size={"shortest_edge": 160, "longest_edge": 256})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def by_hand(model, processor, images, threshold):
    """processor -> model -> post_process_object_detection, as the pipeline's result format."""
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = torch.tensor([(im.height, im.width) for im in images])
    results = processor.post_process_object_detection(outputs, threshold, sizes)
    return [[{"score": s.item(), "label": model.config.id2label[label.item()],
              "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), b.int().tolist()))}
             for s, label, b in zip(r["scores"], r["labels"], r["boxes"])] for r in results]


def assert_same(found, expected):
    assert len(found) == len(expected) > 0
    key = lambda d: (d["label"], d["box"]["xmin"], d["box"]["ymin"])  # noqa: E731
    for f, e in zip(sorted(found, key=key), sorted(expected, key=key)):
        assert f["label"] == e["label"] and f["box"] == e["box"]
        assert f["score"] == pytest.approx(e["score"], abs=1e-5)


def test_pipeline_from_folder_with_remote_code_on_a_photograph(detector):
    model, processor, folder = detector
    detect = pipeline("object-detection", model=str(folder), trust_remote_code=True)
    photo = Image.open(PHOTO)
    found = detect(photo, threshold=0.0)
    assert set(found[0]) == {"score", "label", "box"} and set(found[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    assert {d["label"] for d in found} <= set(model.config.id2label.values())
    assert_same(found, by_hand(model, processor, [photo], 0.0)[0])


def images_of_different_sizes():
    photo = Image.open(PHOTO).convert("RGB")
    return [photo, photo.resize((300, 180)), photo.crop((0, 0, 200, 420))]


def assert_same_per_image(images, found, expected):
    for image, f, e in zip(images, found, expected):
        assert_same(f, e)
        assert all(0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= image.width for d in f)
        assert all(0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= image.height for d in f)


def test_pipeline_from_objects_on_a_list_of_images_of_different_sizes(detector):
    model, processor, _ = detector
    detect = pipeline("object-detection", model=model, image_processor=processor)
    images = images_of_different_sizes()
    found = detect(images, threshold=0.0)
    expected = [by_hand(model, processor, [image], 0.0)[0] for image in images]
    assert_same_per_image(images, found, expected)


def test_pipeline_batches_padded_images_with_a_fixed_pad_size(detector):
    """The pipeline's collate cannot pad pixel_values, so batching uses the processor's pad_size."""
    model, _, _ = detector
    processor = DetrCustomImageProcessor(size={"shortest_edge": 160, "longest_edge": 256},
                                         pad_size={"height": 256, "width": 256})
    detect = pipeline("object-detection", model=model, image_processor=processor)
    images = images_of_different_sizes()
    found = detect(images, threshold=0.0, batch_size=3)
    assert_same_per_image(images, found, by_hand(model, processor, images, 0.0))


def test_pipeline_threshold_filters(detector):
    model, processor, _ = detector
    detect = pipeline("object-detection", model=model, image_processor=processor)
    photo = Image.open(PHOTO)
    assert len(detect(photo, threshold=0.0)) == model.config.num_queries
    assert detect(photo, threshold=1.0) == []


def test_pipeline_threshold_outside_0_1_or_nan_is_refused(detector):
    _, _, folder = detector
    detect = pipeline("object-detection", model=str(folder), trust_remote_code=True)
    photo = Image.open(PHOTO)
    for threshold in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=rf"^threshold = {threshold!r}; expected a number in \[0, 1\]"):
            detect(photo, threshold=threshold)


def test_pipeline_refuses_an_image_whose_resize_has_a_side_of_0_px(detector):
    model, processor, _ = detector
    detect = pipeline("object-detection", model=model, image_processor=processor)
    with pytest.raises(ValueError, match=r"images\[0\] is 1x3000 \(height x width\): resizing it to size = .* gives "
                                         r"0x256, a side of 0 px"):
        detect(Image.new("RGB", (3000, 1)), threshold=0.0)
