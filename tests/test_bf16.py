"""bf16 inference on CPU (issue 21, item 3): `--dtype bf16` of predict.py and evaluate_model.py, the pipeline with
``dtype=torch.bfloat16`` or under autocast, and what bf16 must not change: the fp32 path (bit-identical), the sine
positions (float32, as the original) and post-processing (float32 whatever the outputs' dtype).

The tests that run bf16 are skipped, with the reason, on a CPU without native bfloat16 (`precision`'s own check);
the refusal on such a CPU is tested everywhere by faking the check.

A random tiny DETR predicts nearly the same box for every query (they differ by < 0.1% of the image: its
cross-attention is close to uniform), so a tolerance on it would test little. `sharpened_model` makes each query
look at its own part of the image and spreads the heads' outputs; the tests assert that its boxes and scores vary.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image

from modeling_detr_custom import precision
from modeling_detr_custom.data.synthetic import generate_image
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.precision import DTYPES, check_inference_dtype, inference_autocast

_spec = importlib.util.spec_from_file_location("script_predict_bf16", ROOT / "scripts" / "predict.py")
PREDICT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PREDICT)
EVALUATE = runpy.run_path(str(ROOT / "scripts" / "evaluate_model.py"), run_name="evaluate_bf16")

PHOTO = ROOT / "tests" / "data" / "grace_hopper.jpg"
PROCESSOR_SIZE = {"shortest_edge": 160, "longest_edge": 256}


def _why_no_bf16() -> str | None:
    """None when this CPU runs bf16, else the one-line refusal `check_inference_dtype` gives."""
    try:
        check_inference_dtype("bf16", "cpu")
    except ValueError as err:
        return str(err)
    return None


NO_BF16 = _why_no_bf16()
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"this CPU cannot run bf16: {NO_BF16}")

# Agreement of bf16 with fp32, after post-processing (threshold 0: every query, in query order). bfloat16 keeps
# 8 significant bits (a rounding error of up to 2^-8 = 0.4% of the value), so pred_boxes, which leave the model in
# bf16, are off by up to ~0.002 of the image in (cx, cy, w, h), 0.003 in (x0, y0, x1, y1), before any error of the
# layers before; the logits by a few 2^-8 of their size. Measured on `sharpened_model`, seeds 0-23, the 4
# `sample_images`: max |box diff| / image side 0.0085 under autocast (0.0057 but for seed 11), 0.0064 in bf16
# weights; max |score diff| 0.030 and 0.031 (a demo model after 2,890 training steps, 64 synthetic images: 0.0085
# and 0.010). The tolerances are about 1.8x and 2x those.
BOX_TOL = 0.015  # of the image's width (x0, x1) or height (y0, y1)
SCORE_TOL = 0.06


def sharpened_model(seed: int) -> DetrCustomForObjectDetection:
    """A tiny random DETR (eval mode) whose detections vary from query to query.

    Decoder cross-attention query projections x8 (each query attends to its own region instead of averaging the
    image), class head and the box head's last layer x5 (scores and boxes spread).
    """
    torch.manual_seed(seed)
    model = DetrCustomForObjectDetection(tiny_config()).eval()
    d = model.config.d_model
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.in_proj_weight[:d].mul_(8.0)
        model.class_labels_classifier.weight.mul_(5.0)
        model.bbox_predictor.layers[-1].weight.mul_(5.0)
    return model


def sample_images() -> list[Image.Image]:
    """A photograph at two sizes (one not a multiple of the stride) and two images of synthetic shapes."""
    photo = Image.open(PHOTO).convert("RGB")
    shapes = [generate_image(np.random.default_rng(i), 128, 1, 2, (0, 1, 2))[0] for i in range(2)]
    return [photo, photo.resize((300, 180)), *shapes]


def detections(model: DetrCustomForObjectDetection, processor: DetrCustomImageProcessor, image: Image.Image,
               dtype: str) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Every query's detection of ``image`` (threshold 0, query order: scores (Q,), labels (Q,), boxes (Q, 4)
    absolute xyxy) with the forward under `inference_autocast(dtype)`, and the dtype of the model's logits."""
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad(), inference_autocast(dtype, "cpu"):
        outputs = model(**inputs)
    sizes = torch.tensor([[image.height, image.width]])
    return processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)[0], outputs.logits.dtype


def assert_varied(found: dict[str, torch.Tensor], image: Image.Image) -> None:
    """The detections are not degenerate: the queries' boxes spread over more than 2 x BOX_TOL of the image (in
    the coordinate they spread most in) and their scores over more than SCORE_TOL, so that the tolerances are
    small against the differences between detections (a query matched to another's box would fail)."""
    boxes = found["boxes"] / torch.tensor([image.width, image.height] * 2)
    assert (boxes.amax(0) - boxes.amin(0)).max() > 2 * BOX_TOL, found["boxes"]
    assert found["scores"].max() - found["scores"].min() > SCORE_TOL, found["scores"]


def assert_close(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], image: Image.Image,
                 box_slack_px: float = 0.0) -> None:
    """bf16 detections within the tolerances of fp32's, query by query; labels equal wherever fp32's best class
    leads by more than the score tolerance can swap (near-ties may flip)."""
    assert found["scores"].dtype == found["boxes"].dtype == torch.float32
    assert len(found["scores"]) == len(expected["scores"])
    score_diff = (found["scores"] - expected["scores"]).abs()
    assert score_diff.max() <= SCORE_TOL, score_diff
    side = torch.tensor([image.width, image.height] * 2)
    box_diff = (found["boxes"] - expected["boxes"]).abs()
    assert (box_diff <= BOX_TOL * side + box_slack_px).all(), box_diff / side
    clear = expected["scores"] > 2 * SCORE_TOL  # a swap needs two classes within the tolerance of each other
    assert torch.equal(found["labels"][clear], expected["labels"][clear])


# ----------------------------------------------------------------------------- (a) the model under bf16 autocast


@needs_bf16
@pytest.mark.parametrize("seed", [0, 3])
def test_bf16_autocast_detections_agree_with_fp32_within_the_tolerance(seed: int, one_thread) -> None:
    model = sharpened_model(seed)
    processor = DetrCustomImageProcessor(size=PROCESSOR_SIZE)
    for image in sample_images():
        expected, fp32_dtype = detections(model, processor, image, "fp32")
        found, bf16_dtype = detections(model, processor, image, "bf16")
        assert (fp32_dtype, bf16_dtype) == (torch.float32, torch.bfloat16), "the forward really ran in bf16"
        assert_varied(expected, image)
        assert_close(found, expected, image)


@needs_bf16
def test_sine_positions_are_float32_under_bf16_autocast(one_thread) -> None:
    """The positions the forward computes under autocast are float32 and equal to fp32's, bit for bit (the
    original computes them in float32; in bf16 the positions of a 100-cell row would be off by up to a cell)."""
    model = sharpened_model(0)
    captured = []
    hook = model.model.position_embedding.register_forward_hook(lambda module, args, out: captured.append(out))
    inputs = DetrCustomImageProcessor(size=PROCESSOR_SIZE)(images=sample_images()[:2], return_tensors="pt")  # padded
    with torch.no_grad():
        model(**inputs)
        with inference_autocast("bf16", "cpu"):
            model(**inputs)
    hook.remove()
    fp32, bf16 = captured
    assert fp32.dtype == bf16.dtype == torch.float32
    assert torch.equal(fp32, bf16)


def test_post_processing_is_float32_whatever_the_outputs_dtype() -> None:
    """bf16 (or fp16) outputs are post-processed in float32: the same scores and boxes as the same outputs cast to
    float32 first, bit for bit (a bf16 softmax and box scaling would be off by 2^-8 relative: 2 px at 500 px)."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 12, 4, generator=generator) * 3).to(torch.bfloat16)
    boxes = (torch.rand(2, 12, 4, generator=generator) * 0.5 + 0.25).to(torch.bfloat16)
    sizes = torch.tensor([[480, 640], [997, 1333]])
    processor = DetrCustomImageProcessor()
    for dtype in (torch.bfloat16, torch.float16):
        outputs = {"logits": logits.to(dtype), "pred_boxes": boxes.to(dtype)}
        as_float = {"logits": logits.to(dtype).float(), "pred_boxes": boxes.to(dtype).float()}
        for got, want in zip(processor.post_process_object_detection(outputs, 0.0, sizes),
                             processor.post_process_object_detection(as_float, 0.0, sizes)):
            assert got["scores"].dtype == got["boxes"].dtype == torch.float32
            for key in ("scores", "labels", "boxes"):
                assert torch.equal(got[key], want[key]), key


# ----------------------------------------------------------------------------- (f) fp32 is unchanged


def test_fp32_is_bit_identical_with_and_without_inference_autocast(one_thread) -> None:
    model = sharpened_model(0)
    inputs = DetrCustomImageProcessor(size=PROCESSOR_SIZE)(images=sample_images()[:2], return_tensors="pt")
    with torch.no_grad():
        plain = model(**inputs)
        with inference_autocast("fp32", "cpu"):
            wrapped = model(**inputs)
        assert not torch.is_autocast_enabled("cpu")
    for key in ("logits", "pred_boxes", "last_hidden_state", "encoder_last_hidden_state"):
        assert plain[key].dtype == torch.float32 and torch.equal(plain[key], wrapped[key]), key


# ----------------------------------------------------------------------------- (b) predict.py --dtype bf16


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """`sharpened_model(0)` saved with its processor (and remote code) into a folder."""
    folder = tmp_path_factory.mktemp("bf16") / "detr-sharpened"
    sharpened_model(0).save_pretrained(folder)
    DetrCustomImageProcessor(size=PROCESSOR_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bf16_images")
    for i, image in enumerate(sample_images()):
        image.save(folder / f"img{i}.png")
    return folder


def _predict_report(model_folder: Path, image_folder: Path, out: Path, dtype: str) -> dict:
    code = PREDICT.main(["--model", str(model_folder), str(image_folder), "--threshold", "0", "--device", "cpu",
                         "--dtype", dtype, "--output_dir", str(out)])
    assert code == 0
    return json.loads((out / "detections.json").read_text())


def _as_tensors(entries: list[dict]) -> dict[str, torch.Tensor]:
    """predict.py's detections of one image as post-processing's columns."""
    return {"scores": torch.tensor([d["score"] for d in entries]),
            "labels": torch.tensor([d["label_id"] for d in entries]),
            "boxes": torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in entries])}


@needs_bf16
def test_predict_script_with_dtype_bf16_writes_detections_close_to_fp32(model_folder: Path, image_folder: Path,
                                                                        tmp_path: Path, one_thread,
                                                                        monkeypatch) -> None:
    from modeling_detr_custom import predict

    dtypes = []  # the logits' dtype of each forward, as predict checks them
    check = predict.check_finite_outputs
    monkeypatch.setattr(predict, "check_finite_outputs",
                        lambda logits, boxes, what: (dtypes.append(logits.dtype), check(logits, boxes, what)))
    fp32 = _predict_report(model_folder, image_folder, tmp_path / "fp32", "fp32")
    assert dtypes and set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = _predict_report(model_folder, image_folder, tmp_path / "bf16", "bf16")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert (fp32["dtype"], bf16["dtype"]) == ("fp32", "bf16")
    assert len(bf16["images"]) == len(sample_images())
    for want, got in zip(fp32["images"], bf16["images"]):
        assert want["path"] == got["path"] and (tmp_path / "bf16" / got["output_image"]).is_file()
        assert len(got["detections"]) == tiny_config().num_queries  # threshold 0: every query
        image = Image.open(got["path"])
        # the report rounds scores to 1e-5 and boxes to 0.01 px
        assert_close(_as_tensors(got["detections"]), _as_tensors(want["detections"]), image, box_slack_px=0.01)


# ----------------------------------------------------------------------------- (c) the pipeline


def _pipeline_columns(found: list[dict]) -> dict[str, torch.Tensor]:
    """The pipeline's detections of one image as post-processing's columns (labels as names' order)."""
    names = list(tiny_config().id2label.values())
    return {"scores": torch.tensor([d["score"] for d in found]),
            "labels": torch.tensor([names.index(d["label"]) for d in found]),
            "boxes": torch.tensor([[float(d["box"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] for d in found])}


@needs_bf16
def test_pipeline_in_bf16_weights_and_under_autocast_is_close_to_fp32(model_folder: Path, one_thread) -> None:
    """``pipeline(..., dtype=torch.bfloat16)`` casts the weights and the inputs to bf16 (pure bf16, no autocast);
    an fp32 pipeline called under CPU autocast runs the forward in bf16 too. Both stay within the tolerances of
    the fp32 pipeline (its boxes are truncated to whole pixels: one pixel more)."""
    from transformers import pipeline

    fp32 = pipeline("object-detection", model=str(model_folder), trust_remote_code=True)
    bf16 = pipeline("object-detection", model=str(model_folder), trust_remote_code=True, dtype=torch.bfloat16)
    assert fp32.model.dtype == torch.float32 and bf16.model.dtype == torch.bfloat16
    for image in sample_images():
        expected = _pipeline_columns(fp32(image, threshold=0.0))
        assert_varied(expected, image)
        found = _pipeline_columns(bf16(image, threshold=0.0))
        assert torch.isfinite(found["scores"]).all()
        assert_close(found, expected, image, box_slack_px=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = _pipeline_columns(fp32(image, threshold=0.0))
        assert_close(under_autocast, expected, image, box_slack_px=1.0)


# ----------------------------------------------------------------------------- evaluate_model.py --dtype


@pytest.fixture
def fresh_accelerate_state():
    """evaluate_model builds an Accelerator; accelerate keeps singletons between runs."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _evaluate(model_folder: Path, cache_dir: Path, out: Path, *extra: str) -> dict:
    """evaluate_model.py on 3 synthetic 64 px images (labels 0..2, as the model's), on the CPU."""
    return EVALUATE["main"](["--model", str(model_folder), "--cache_dir", str(cache_dir), "--synthetic_num_train",
                             "8", "--synthetic_num_val", "3", "--synthetic_image_size", "64", "--contiguous_labels",
                             "--cpu", "--output_file", str(out), *extra])


@needs_bf16
def test_evaluate_model_with_dtype_bf16_runs_the_forward_in_bf16_and_records_it(
        model_folder: Path, tmp_path: Path, fresh_accelerate_state, one_thread, monkeypatch) -> None:
    dtypes = []
    original = DetrCustomForObjectDetection.forward

    def forward(self, *args, **kwargs):  # the dtype each evaluation forward computes in
        outputs = original(self, *args, **kwargs)
        dtypes.append(outputs.logits.dtype)
        return outputs

    monkeypatch.setattr(DetrCustomForObjectDetection, "forward", forward)
    result = _evaluate(model_folder, tmp_path / "cache", tmp_path / "bf16.json", "--dtype", "bf16")
    written = json.loads((tmp_path / "bf16.json").read_text())
    assert written["dtype"] == result["dtype"] == "bf16" and written["mixed_precision"] == "no"
    assert dtypes and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    fp32 = _evaluate(model_folder, tmp_path / "cache", tmp_path / "fp32.json")  # the default
    assert fp32["dtype"] == "fp32" and set(dtypes) == {torch.float32}


# ----------------------------------------------------------------------------- (d), (e) refusals


def _no_native_bf16(monkeypatch) -> None:
    """Pretend to be an AVX2 CPU (no bf16 instructions)."""
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def test_a_cpu_without_native_bf16_is_refused_in_one_line_naming_its_capability(monkeypatch) -> None:
    _no_native_bf16(monkeypatch)
    with pytest.raises(ValueError) as caught:
        check_inference_dtype("bf16", "cpu")
    message = str(caught.value)
    assert "\n" not in message and "bf16" in message and "AVX2" in message and "use --dtype fp32" in message
    with pytest.raises(ValueError, match="use --dtype fp32"):
        inference_autocast("bf16", torch.device("cpu"))
    check_inference_dtype("fp32", "cpu")  # fp32 runs anywhere


def test_predict_script_refuses_bf16_on_such_a_cpu_before_any_work(model_folder: Path, image_folder: Path,
                                                                  tmp_path: Path, monkeypatch, capsys) -> None:
    _no_native_bf16(monkeypatch)
    out = tmp_path / "out"
    code = PREDICT.main(["--model", str(model_folder), str(image_folder), "--device", "cpu", "--dtype", "bf16",
                         "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: --dtype bf16 needs a CPU") and "AVX2" in err
    assert not out.exists(), "refused before anything was written"


def test_evaluate_model_refuses_bf16_on_such_a_cpu(model_folder: Path, tmp_path: Path, fresh_accelerate_state,
                                                   monkeypatch) -> None:
    _no_native_bf16(monkeypatch)
    with pytest.raises(ValueError, match="AVX2 .*use --dtype fp32"):
        _evaluate(model_folder, tmp_path / "cache", tmp_path / "eval.json", "--dtype", "bf16")
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "cache").exists(), "refused before any work"


@pytest.mark.parametrize("bad", ["fp16", "bfloat16", "BF16", ""])
def test_an_unknown_dtype_is_refused_naming_it(bad: str, model_folder: Path, image_folder: Path, tmp_path: Path,
                                               capsys) -> None:
    with pytest.raises(ValueError) as caught:
        check_inference_dtype(bad, "cpu")
    assert str(caught.value) == f"--dtype must be one of {', '.join(DTYPES)}; got {bad!r}"
    with pytest.raises(SystemExit) as exited:  # the script: argparse's usage error, status 2
        PREDICT.main(["--model", str(model_folder), str(image_folder), "--dtype", bad,
                      "--output_dir", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert f"--dtype: invalid choice: {bad!r}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        EVALUATE["main"](["--model", str(model_folder), "--dtype", bad, "--output_file", str(tmp_path / "e.json")])
    assert exited.value.code == 2
    assert f"--dtype: invalid choice: {bad!r}" in capsys.readouterr().err


def test_an_unknown_dtype_from_an_options_file_is_refused_naming_it(model_folder: Path, tmp_path: Path,
                                                                    fresh_accelerate_state) -> None:
    """An options file (--config) is not checked by argparse: evaluate_model's own check names the value."""
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"dtype": "fp16"}))
    with pytest.raises(ValueError, match=r"^--dtype must be one of fp32, bf16; got 'fp16'$"):
        _evaluate(model_folder, tmp_path / "cache", tmp_path / "eval.json", "--config", str(options))
    assert not (tmp_path / "cache").exists(), "refused before any work"
