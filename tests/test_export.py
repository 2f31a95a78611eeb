"""ONNX export (issue 13): verified with onnxruntime before it is written, refused when it disagrees.

The fast tests export a random tiny model at 48x80 (the processor's pad_size), one torch thread; the slow test
exports the R50 config (random weights, nothing downloaded) at 320x480.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import ROOT, tiny_config
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from PIL import Image
from transformers import pipeline

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor, export
from modeling_detr_custom.export import ATOL, DetectionGraph, OnnxExportError, export_detector, export_onnx

PHOTO = ROOT / "tests" / "data" / "grace_hopper.jpg"
CANVAS = (48, 80)

_spec = importlib.util.spec_from_file_location("script_export_onnx", ROOT / "scripts" / "export_onnx.py")
SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SCRIPT)


# the tiny model's matrices are too small to share: a second thread only adds contention
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model whose processor pads every batch to 48x80 (landscape images up to 80 wide)."""
    folder = tmp_path_factory.mktemp("export") / "detr-tiny"
    torch.manual_seed(0)
    DetrCustomForObjectDetection(tiny_config()).save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 48, "longest_edge": 80},
                             pad_size={"height": 48, "width": 80}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir) -> DetrCustomForObjectDetection:
    return DetrCustomForObjectDetection.from_pretrained(model_dir).eval()


def run_both(model, session, pixel_values, pixel_mask) -> dict[str, float]:
    """max |onnxruntime - PyTorch| per output on one batch."""
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    found = session.run(["logits", "pred_boxes"], {"pixel_values": pixel_values.numpy(),
                                                   "pixel_mask": pixel_mask.numpy()})
    return {name: float(np.abs(f - getattr(expected, name).numpy()).max())
            for name, f in zip(("logits", "pred_boxes"), found)}


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("settings, canvas", [
    (dict(size={"shortest_edge": 48, "longest_edge": 80}, pad_size={"height": 64, "width": 96}), (64, 96)),
    (dict(size={"height": 40, "width": 72}), (40, 72)),
    (dict(size={"shortest_edge": 800, "longest_edge": 1333}), (800, 1333)),
    (dict(size={"shortest_edge": 800}), (800, 1066)),  # a 4:3 image at short side 800
])
def test_default_canvas_is_what_the_processor_produces(settings, canvas):
    assert export.default_canvas(DetrCustomImageProcessor(**settings)) == canvas


# ----------------------------------------------------------------------------- exports that verify


@pytest.mark.parametrize("dynamic_batch, dynamic_size, checks", [
    (False, False, 2), (True, False, 3), (False, True, 4), (True, True, 6)])
def test_export_verifies_writes_its_json_and_matches_pytorch_in_a_fresh_session(
        model_dir, model, tmp_path, dynamic_batch, dynamic_size, checks):
    output = tmp_path / "detr.onnx"
    spec = export_onnx(model_dir, output, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
    assert files_in(tmp_path) == {"detr.onnx", "detr.json"}  # no temporary file left
    assert json.loads((tmp_path / "detr.json").read_text()) == spec
    batch = "batch" if dynamic_batch else 1
    height, width = ("height", "width") if dynamic_size else CANVAS
    assert [(i["name"], i["shape"], i["dtype"]) for i in spec["inputs"]] == [
        ("pixel_values", [batch, 3, height, width], "float32"), ("pixel_mask", [batch, height, width], "int64")]
    assert [(o["name"], o["shape"], o["dtype"]) for o in spec["outputs"]] == [
        ("logits", [batch, 12, 4], "float32"), ("pred_boxes", [batch, 12, 4], "float32")]
    assert spec["opset"] == export.DEFAULT_OPSET and spec["num_queries"] == 12
    assert spec["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
    processor = spec["processor"]
    assert processor["size"] == {"shortest_edge": 48, "longest_edge": 80} and processor["pad_size"] == {
        "height": 48, "width": 80}
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["rescale_factor"] == pytest.approx(1 / 255)
    assert processor["do_normalize"] is True and processor["do_rescale"] is True
    assert len(spec["verification"]["checks"]) == checks
    assert all(d <= ATOL for c in spec["verification"]["checks"] for d in c["max_abs_diff"].values())

    graph = onnx.load(output)
    assert graph.opset_import[0].version == export.DEFAULT_OPSET
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    # inputs the verification never saw: 3 images when the batch is dynamic, another canvas when the size is
    canvas = (56, 72) if dynamic_size else CANVAS
    sizes = [(40, 52), canvas, (30, 64)][: 3 if dynamic_batch else 1]
    pixel_values, pixel_mask = export.padded_images(canvas, sizes, seed=7)
    assert max(run_both(model, session, pixel_values, pixel_mask).values()) <= ATOL
    if not dynamic_batch:
        with pytest.raises(InvalidArgument, match="Got: 2 Expected: 1"):
            run_both(model, session, pixel_values.repeat(2, 1, 1, 1), pixel_mask.repeat(2, 1, 1))


def as_pipeline_results(results, id2label):
    """post_process_object_detection's tensors in the pipeline's format (int pixel boxes)."""
    return [[{"score": s.item(), "label": id2label[label.item()],
              "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), b.int().tolist()))}
             for s, label, b in zip(r["scores"], r["labels"], r["boxes"])] for r in results]


def test_onnxruntime_on_a_padded_batch_gives_the_pipelines_detections(model_dir, tmp_path):
    output = tmp_path / "detr.onnx"
    export_onnx(model_dir, output, dynamic_batch=True)
    photo = Image.open(PHOTO).convert("RGB")
    images = [photo.resize((120, 72)), photo.crop((0, 0, 200, 150))]  # 80x48 and 64x48 after resizing
    detector = pipeline("object-detection", model=str(model_dir), trust_remote_code=True)
    expected = [detector(image, threshold=0.0) for image in images]

    processor = DetrCustomImageProcessor.from_pretrained(model_dir)
    spec = json.loads((tmp_path / "detr.json").read_text())
    inputs = processor(images=images, return_tensors="np", pad_size=spec["processor"]["pad_size"])
    assert inputs["pixel_mask"][1].all(axis=0).sum() == 64  # the second image is padded on the right
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    logits, pred_boxes = session.run(["logits", "pred_boxes"], dict(inputs))
    results = processor.post_process_object_detection({"logits": logits, "pred_boxes": pred_boxes}, threshold=0.0,
                                                      target_sizes=[image.size[::-1] for image in images])
    found = as_pipeline_results(results, {int(k): v for k, v in spec["id2label"].items()})
    key = lambda d: (d["label"], d["box"]["xmin"], d["box"]["ymin"], d["box"]["xmax"])  # noqa: E731
    for f, e in zip(found, expected, strict=True):
        assert len(f) == len(e) == 12
        for a, b in zip(sorted(f, key=key), sorted(e, key=key)):
            assert (a["label"], a["box"]) == (b["label"], b["box"])
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


# ----------------------------------------------------------------------------- exports that are refused


class BranchOnPadding(DetectionGraph):
    """A forward with a Python branch on tensor values: the tracer records the branch the example took."""

    def forward(self, pixel_values, pixel_mask):
        logits, pred_boxes = super().forward(pixel_values, pixel_mask)
        if bool((pixel_mask == 0).any()):
            logits = logits + 1.0
        return logits, pred_boxes


def test_a_graph_that_traces_differently_from_eager_is_refused_and_nothing_is_written(
        model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "DetectionGraph", BranchOnPadding)
    with pytest.raises(OnnxExportError) as raised:
        export_onnx(model_dir, tmp_path / "detr.onnx")
    message = str(raised.value)
    assert "disagrees with PyTorch (tolerance 0.0001) on 1 of 2 checks" in message
    assert "'batch 1 on a 48x80 canvas (images 36x48)': max |diff| logits 1, pred_boxes " in message
    assert f"{Path(__file__).name}:" in message  # where the tracer recorded the branch as a constant
    assert files_in(tmp_path) == set()


def add_to_class_bias(path: Path) -> None:
    model = onnx.load(path)
    bias = next(i for i in model.graph.initializer if i.name.endswith("class_labels_classifier.bias"))
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.5, bias.name))
    onnx.save(model, path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("tamper, message", [
    (add_to_class_bias, r"on 2 of 2 checks: 'batch 1 on a 48x80 canvas \(images 48x80\)': max \|diff\| logits 0.5"),
    (truncate, r"onnxruntime cannot load the exported graph"),
])
def test_a_graph_tampered_with_before_verification_is_refused(model_dir, tmp_path, monkeypatch, tamper, message):
    real = export.export_graph

    def export_then_tamper(graph, example, path, opset, axes):
        found = real(graph, example, path, opset, axes)
        tamper(path)
        return found

    monkeypatch.setattr(export, "export_graph", export_then_tamper)
    with pytest.raises(OnnxExportError, match=message):
        export_onnx(model_dir, tmp_path / "detr.onnx")
    assert files_in(tmp_path) == set()


def test_non_finite_outputs_are_refused(tmp_path):
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(tiny_config()).eval()
    with torch.no_grad():
        model.class_labels_classifier.bias[1] = float("nan")
    message = r"check 'batch 1 on a 48x80 canvas \(images 48x80\)': PyTorch logits has non-finite values \(12 of 48\)"
    with pytest.raises(OnnxExportError, match=message):
        export_detector(model, DetrCustomImageProcessor(), tmp_path / "detr.onnx", canvas=CANVAS)
    assert files_in(tmp_path) == set()


class EveryQueryGroup(DetectionGraph):
    """Outputs with twice config.num_queries queries, as Group DETR's training mode gives them."""

    def forward(self, pixel_values, pixel_mask):
        logits, pred_boxes = super().forward(pixel_values, pixel_mask)
        return logits.repeat(1, 2, 1), pred_boxes.repeat(1, 2, 1)


def test_outputs_the_json_would_misdescribe_are_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "DetectionGraph", EveryQueryGroup)
    with pytest.raises(OnnxExportError, match=r"PyTorch logits has shape \(1, 24, 4\), expected \(1, 12, 4\)"):
        export_onnx(model_dir, tmp_path / "detr.onnx")
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("existing", ["detr.onnx", "detr.json"])
def test_an_existing_output_is_refused_unless_overwrite(model_dir, tmp_path, existing):
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(ValueError, match=rf"{existing}' already exists; pass overwrite=True \(--overwrite\)"):
        export_onnx(model_dir, tmp_path / "detr.onnx")
    assert files_in(tmp_path) == {existing} and (tmp_path / existing).read_text() == "keep me"
    export_onnx(model_dir, tmp_path / "detr.onnx", overwrite=True)
    assert files_in(tmp_path) == {"detr.onnx", "detr.json"}
    assert json.loads((tmp_path / "detr.json").read_text())["onnx_file"] == "detr.onnx"


@pytest.mark.parametrize("output, kwargs, message", [
    ("missing/detr.onnx", {}, r"its folder '.*missing' is not an existing directory"),
    ("a_file/detr.onnx", {}, r"its folder '.*a_file' is not an existing directory"),
    ("detr.pb", {}, r"must end with .onnx \(its settings go to detr.json\)"),
    ("detr.onnx", {"opset": 13}, r"opset 13 is not supported: expected an int from 14 to 20"),
    ("detr.onnx", {"height": 16, "width": 80}, r"export size \(16, 80\) \(height, width\): expected two ints >= 32"),
    ("detr.onnx", {"height": 64}, r"height=64, width=None: give both or neither"),
])
def test_bad_arguments_are_refused_naming_the_value(model_dir, tmp_path, output, kwargs, message):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=message):
        export_onnx(model_dir, tmp_path / output, **kwargs)
    assert files_in(tmp_path) == {"a_file"}


def test_script_refuses_an_existing_output_in_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "detr.onnx").write_text("")
    assert SCRIPT.main(["--model", str(model_dir), "--output", str(tmp_path / "detr.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "already exists" in err


def test_script_end_to_end(model_dir, tmp_path):
    output = tmp_path / "detr.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_onnx.py"), "--model", str(model_dir),
                           "--output", str(output), "--dynamic_batch", "--dynamic_size", "--height", "64",
                           "--width", "64", "--opset", "18"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {output} and {tmp_path / 'detr.json'}: onnxruntime agrees with PyTorch "
                                  "on 6 checks"), proc.stdout
    spec = json.loads((tmp_path / "detr.json").read_text())
    assert spec["opset"] == 18 and spec["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert spec["verification"]["checks"][0]["check"] == "batch 1 on a 64x64 canvas (images 64x64)"
    assert files_in(tmp_path) == {"detr.onnx", "detr.json"}


@pytest.mark.slow
def test_r50_exports_and_verifies(tmp_path):
    """DETR-R50 (DetrCustomConfig's defaults, random weights: construction never downloads) at 320x480."""
    folder = tmp_path / "detr-r50"
    torch.manual_seed(0)
    DetrCustomForObjectDetection(DetrCustomConfig()).save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 320, "longest_edge": 480}).save_pretrained(folder)
    spec = export_onnx(folder, tmp_path / "r50.onnx", dynamic_batch=True, dynamic_size=True)
    checks = spec["verification"]["checks"]
    assert [c["check"] for c in checks][:3] == ["batch 1 on a 320x480 canvas (images 320x480)",
                                                "batch 1 on a 320x480 canvas (images 240x288)",
                                                "batch 2 on a 320x480 canvas (images 320x480 + 240x288)"]
    assert len(checks) == 6 and spec["outputs"][0]["shape"] == ["batch", 100, 92]
    assert all(d <= ATOL for c in checks for d in c["max_abs_diff"].values())
    assert (tmp_path / "r50.onnx").stat().st_size > 100e6  # 41 M float32 parameters
