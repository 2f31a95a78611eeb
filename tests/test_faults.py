"""Bad input and faults (issue 11): nothing lost, nothing silently wrong. Fast, tiny configs, CPU.

One test per defect of the issue, most severe first; each failed before the fix. Training runs are in-process
(scripts/train.py's `main`), a few steps of the `tiny` preset on the synthetic shapes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.ImageOps
import pytest
import torch
from conftest import ROOT, padded_batch, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from test_training import (  # noqa: F401 - fresh_accelerate_state is an autouse fixture
    EVALUATE,
    TRAIN,
    OneProcess,
    fresh_accelerate_state,
    fresh_accelerate_state_reset,
    mixed_size_coco,
    read_json,
    read_jsonl,
    tiny_run_args,
    write_coco,
)

from modeling_detr_custom import hub
from modeling_detr_custom.data import load_coco_folder_with_info, metric_references, without_image_decoding
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.training import (
    NonFiniteLossError,
    evaluate_coco,
    list_checkpoints,
    make_eval_dataloader,
)

_spec = importlib.util.spec_from_file_location("script_predict_faults", ROOT / "scripts" / "predict.py")
PREDICT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PREDICT)
PUSH = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"), run_name="push_script")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir: Path) -> Path:
    """A finished 2-step tiny run with checkpoint-1 and checkpoint-2; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    TRAIN["main"](tiny_run_args(out, cache_dir, "--checkpointing_steps", "1", "--picture_images", "0", steps=2))
    fresh_accelerate_state_reset()
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def save_model(folder: Path, broken: str | None = None) -> Path:
    """A tiny random model + processor; ``broken``: "nan" (one NaN weight), "missing" (one key dropped from
    model.safetensors) or "truncated" (model.safetensors cut in half)."""
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(tiny_config(num_queries=2))
    if broken == "nan":
        with torch.no_grad():
            model.class_labels_classifier.bias[0] = float("nan")
    model.save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    weights_file = folder / "model.safetensors"
    if broken == "missing":
        weights = load_file(weights_file)
        del weights["model.decoder.layernorm.bias"]
        save_file(weights, weights_file, metadata={"format": "pt"})
    if broken == "truncated":
        data = weights_file.read_bytes()
        weights_file.write_bytes(data[: len(data) // 2])
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. a new run into an old run's folder


def test_new_run_into_a_previous_run_is_refused_and_overwrite_saves_the_new_run(
        finished_run: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    args = tiny_run_args(out, cache_dir, "--checkpointing_steps", "1", "--picture_images", "0", "--seed", "7", steps=2)
    with pytest.raises(ValueError, match=r"holds a previous run \(checkpoints, training_args.json.*"
                                         r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        TRAIN["main"](args)
    assert snapshot(out) == before, "a refused run writes nothing"
    fresh_accelerate_state_reset()
    TRAIN["main"](args + ["--overwrite_output_dir"])
    final = load_file(out / "model.safetensors")
    newest = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    old = load_file(finished_run / "model.safetensors")
    assert all(torch.equal(final[k], newest[k]) for k in final), "checkpoint-2 is the new run's state"
    assert any(not torch.equal(final[k], old[k]) for k in final), "another seed: the new run's own weights"
    assert [d["step"] for d in read_jsonl(out / "metrics.jsonl") if "train_loss_ce" in d] == [1, 2]
    assert read_json(out / "training_args.json")["seed"] == 7


# ----------------------------------------------------------------------------- 2. predict never overwrites inputs


def test_predict_into_the_input_folder_keeps_every_input_and_foreign_file(tmp_path: Path, capsys) -> None:
    model = save_model(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).convert("P").save(folder / "palette.png")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(folder / "other.jpg")
    (folder / "other.png").write_bytes(b"someone's file, not an image")  # the drawing of other.jpg would be here
    before = snapshot(folder)
    assert PREDICT.main(["--model", str(model), str(folder / "palette.png"), str(folder / "other.jpg"),
                         "--threshold", "0", "--output_dir", str(folder)]) == 0
    assert {k: v for k, v in snapshot(folder).items() if k in before} == before, "inputs and other files intact"
    report = json.loads((folder / "detections.json").read_text())
    assert [i["output_image"] for i in report["images"]] == ["palette_1.png", "other_1.png"]
    assert Image.open(folder / "palette_1.png").size == (64, 48)
    # a second run, with --overwrite, may replace what the first one wrote, and nothing else
    assert PREDICT.main(["--model", str(model), str(folder / "palette.png"), "--output_dir", str(folder),
                         "--overwrite"]) == 0
    assert {k: v for k, v in snapshot(folder).items() if k in before} == before
    assert json.loads((folder / "detections.json").read_text())["images"][0]["output_image"] == "palette_1.png"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "detections.json").write_text('{"mine": 1}')
    assert PREDICT.main(["--model", str(model), str(folder / "palette.png"), "--output_dir", str(foreign)]) == 1
    assert "is not a report of predict.py" in capsys.readouterr().err
    assert (foreign / "detections.json").read_text() == '{"mine": 1}' and len(list(foreign.iterdir())) == 1


# ----------------------------------------------------------------------------- 3. 16-bit images


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535], [65535, 32896, 257, 0]], dtype=np.uint16)
EIGHT_BIT = np.array([[0, 1, 128, 255], [255, 128, 1, 0]], dtype=np.uint8)


def high_bit_depth_images() -> dict[str, Image.Image]:
    return {"I;16": Image.fromarray(SIXTEEN_BIT),
            "I;16B": Image.frombytes("I;16B", (4, 2), SIXTEEN_BIT.astype(">u2").tobytes()),
            "I": Image.fromarray(SIXTEEN_BIT.astype(np.int32)),
            "F": Image.fromarray((SIXTEEN_BIT / 65535).astype(np.float32))}


def test_16_bit_images_are_scaled_to_8_bits_in_processor_training_predict_and_the_data_check(tmp_path: Path) -> None:
    from modeling_detr_custom.data import pil_to_uint8_chw
    from modeling_detr_custom.image_processing_detr_custom import pil_to_rgb8
    from modeling_detr_custom.predict import open_image

    expected = np.repeat(EIGHT_BIT[..., None], 3, axis=-1)
    for mode, image in high_bit_depth_images().items():
        assert image.mode == mode
        assert np.array_equal(np.asarray(pil_to_rgb8(image)), expected), mode
    processor = DetrCustomImageProcessor(do_resize=False)
    sixteen = high_bit_depth_images()["I;16"]
    assert torch.equal(processor(sixteen)["pixel_values"], processor(Image.fromarray(EIGHT_BIT))["pixel_values"])
    with pytest.raises(ValueError, match=r"images\[0\] has PIL mode I with values in \[-5, 65535\]"):
        processor(Image.fromarray(np.array([[-5, 65535]], dtype=np.int32)))
    write_coco(tmp_path / "coco", "train", [{"file_name": "deep.png", "width": 4, "height": 2}], [])
    png = tmp_path / "coco" / "images" / "train" / "deep.png"
    sixteen.save(png)
    assert Image.open(png).mode == "I;16"
    assert np.array_equal(pil_to_uint8_chw({"path": str(png), "bytes": None}).permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(np.asarray(open_image(png)), expected)
    data = load_coco_folder_with_info(tmp_path / "coco", cache_dir=str(tmp_path / "cache"))
    assert data.report["train"]["high_bit_depth_images"] == 1


# ----------------------------------------------------------------------------- 4. inexact resume


def test_resume_that_cannot_restore_the_rng_state_says_so(finished_run: Path, cache_dir: Path, tmp_path: Path,
                                                         caplog) -> None:
    out = copy_run(finished_run, tmp_path)
    rng_file = out / "checkpoints" / "checkpoint-2" / "random_states_0.pkl"
    rng_file.write_bytes(b"")
    TRAIN["main"](tiny_run_args(out, cache_dir, "--resume_from_checkpoint", "latest", "--picture_images", "0", steps=3))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("is NOT exact" in m and str(rng_file) in m for m in warnings), warnings


# ----------------------------------------------------------------------------- 5. a learning rate changed at resume


def test_learning_rate_changed_at_resume_is_used_and_logged(finished_run: Path, cache_dir: Path, tmp_path: Path,
                                                            caplog) -> None:
    out = copy_run(finished_run, tmp_path)
    TRAIN["main"](tiny_run_args(out, cache_dir, "--resume_from_checkpoint", "latest", "--picture_images", "0",
                                "--learning_rate", "5e-5", steps=3))
    lrs = [d["lr"] for d in read_jsonl(out / "metrics.jsonl") if "lr" in d]
    assert lrs == [1e-4, 1e-4, 5e-5], "the new learning rate from the resumed step on"
    assert read_json(out / "training_args.json")["learning_rate"] == 5e-5, "recorded = used"
    assert any("learning rate of group transformer changed: 0.0001 in the checkpoint, 5e-05" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------- 6 + 11. NaN and incomplete weights


@pytest.mark.parametrize("broken, message", [("nan", "hold NaN or Inf"), ("missing", "is incomplete: 1 parameter"),
                                             ("truncated", "model.safetensors is corrupt or truncated")])
def test_broken_weights_are_refused_by_predict_evaluate_and_push(broken: str, message: str, tmp_path: Path,
                                                                 cache_dir: Path, capsys) -> None:
    """NaN weights (6), weights with a key missing (11) and a truncated weights file (10): one clear line."""
    model = save_model(tmp_path / "model", broken)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    assert PREDICT.main(["--model", str(model), str(image), "--output_dir", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        EVALUATE["main"](["--model", str(model), "--cache_dir", str(cache_dir), "--synthetic_num_train", "8",
                          "--synthetic_num_val", "3", "--synthetic_image_size", "64"])
    assert PUSH["main"](["--model_dir", str(model), "--repo_id", "someone/x",
                         "--local_dir", str(tmp_path / "hub")]) == 1
    assert message in capsys.readouterr().err


def test_non_finite_outputs_fail_evaluation_and_the_hub_comparison(tmp_path: Path) -> None:
    model = DetrCustomForObjectDetection(tiny_config(num_queries=2))
    with torch.no_grad():
        model.bbox_predictor.layers[-1].bias.fill_(float("nan"))  # pred_boxes NaN, logits fine
    data = load_coco_folder_with_info(mixed_size_coco(tmp_path / "coco"), cache_dir=str(tmp_path / "cache"))
    dataset, mapping = without_image_decoding(data.dataset["val"]), data.label_mapping.label_to_category_id
    processor = DetrCustomImageProcessor(size={"shortest_edge": 48, "longest_edge": 80})
    with pytest.raises(ValueError, match="evaluation: the model's outputs hold NaN or Inf"):
        evaluate_coco(model, make_eval_dataloader(dataset, processor, 2), processor, OneProcess(),
                      metric_references(dataset, mapping), mapping)
    nan = {"logits": torch.full((1, 2, 4), float("nan")), "pred_boxes": torch.zeros(1, 2, 4)}
    same = {**nan, "pixel_values": torch.zeros(1), "pixel_mask": torch.zeros(1),
            "base_last_hidden_state": torch.zeros(1),
            "pipeline": []}
    assert hub.compare_outputs(same, same) == ["logits: NaN or Inf in the outputs (no tolerance check can pass them)"]


# ----------------------------------------------------------------------------- 7. a truncated validation image


def test_truncated_validation_image_does_not_crash_the_end_of_training(tmp_path: Path, caplog) -> None:
    coco = mixed_size_coco(tmp_path / "coco")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (coco / "images" / "val" / "a.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    out = tmp_path / "run"
    results = TRAIN["main"](["--model_config", "tiny", "--coco_dir", str(coco), "--image_size", "64",
                             "--max_steps", "1",
                             "--per_device_train_batch_size", "2", "--picture_images", "3",
                             "--checkpointing_epochs", "0",
                             "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)])
    assert results["global_step"] == 1 and results["eval_num_images"] == 3
    assert Image.open(out / "detections.png").width >= 3 * 256, "the picture, the unreadable image grey"
    assert "cannot be decoded" in caplog.text


# ----------------------------------------------------------------------------- 8 + 12. divergence


def patch_training_forward(monkeypatch, at_call: int, change) -> None:
    """Apply ``change(model, outputs or None)`` at the ``at_call``-th training forward."""
    original = DetrCustomForObjectDetection.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += self.training
        if self.training and calls["n"] == at_call:
            change(self, None)
        outputs = original(self, *args, **kwargs)
        if self.training and calls["n"] == at_call:
            change(self, outputs)
        return outputs

    monkeypatch.setattr(DetrCustomForObjectDetection, "forward", forward)


def test_diverged_predictions_stop_on_the_non_finite_loss_path(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    def poison(model, outputs):
        if outputs is None:  # before the forward: NaN class logits, which the matcher refuses
            with torch.no_grad():
                model.class_labels_classifier.weight.fill_(float("nan"))

    patch_training_forward(monkeypatch, 3, poison)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3.*matcher refused.*checkpoint-2"):
        TRAIN["run_training"](TRAIN["parse_args"](tiny_run_args(out, cache_dir, "--checkpointing_steps", "1", steps=5)))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert read_jsonl(out / "metrics.jsonl")[-1]["event"] == "non_finite_loss"


def test_finite_loss_blowup_is_warned_about(tmp_path: Path, cache_dir: Path, monkeypatch, caplog) -> None:
    def blow_up(model, outputs):
        if outputs is not None:
            outputs.loss = outputs.loss * 1e4

    patch_training_forward(monkeypatch, 3, blow_up)
    out = tmp_path / "run"
    TRAIN["main"](tiny_run_args(out, cache_dir, "--picture_images", "0", steps=4))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("is over 100x the first step's loss" in m and "at step 3" in m for m in warnings) == 1, warnings
    assert [d["event"] for d in read_jsonl(out / "metrics.jsonl") if "event" in d] == ["loss_blowup"]


# ----------------------------------------------------------------------------- 9. EXIF-rotated images with boxes


def test_boxes_of_an_exif_rotated_image_turn_with_it() -> None:
    raw = np.zeros((40, 60, 3), dtype=np.uint8)
    raw[4:14, 10:32] = (255, 0, 0)  # COCO box [10, 4, 22, 10] in the stored pixel grid
    processor = DetrCustomImageProcessor(do_resize=False)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(raw).save(buffer, format="PNG", exif=exif.tobytes())
        image = Image.open(buffer)
        labels = processor(image, annotations={"image_id": 0, "annotations": [{"bbox": [10, 4, 22, 10],
                                                                              "category_id": 0}]})["labels"][0]
        upright = np.asarray(PIL.ImageOps.exif_transpose(image))[..., 0] > 128
        ys, xs = np.nonzero(upright)
        height, width = upright.shape
        expected = [(xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height,
                    (xs.max() + 1 - xs.min()) / width, (ys.max() + 1 - ys.min()) / height]
        assert labels["size"].tolist() == [height, width]
        assert torch.allclose(labels["boxes"][0], torch.tensor(expected, dtype=torch.float32), atol=1e-6), orientation


# ----------------------------------------------------------------------------- 10. one clear line


def test_bad_files_and_folders_are_one_clear_line(tmp_path: Path, cache_dir: Path, capsys) -> None:
    annotations = write_coco(tmp_path / "coco", "train", [{"file_name": "a.png", "width": 8, "height": 8}], [])
    annotations.write_text('{"images": [}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(annotations))} is not valid JSON: .* at line 1, column 13"):
        load_coco_folder_with_info(tmp_path / "coco", cache_dir=str(tmp_path / "cache"))
    (tmp_path / "options.json").write_text("{'seed': 1}")
    with pytest.raises(ValueError, match=r"options.json is not valid JSON"):
        TRAIN["parse_args"](["--config", str(tmp_path / "options.json")])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError,
                       match=re.escape(f"--output_dir {blocker / 'run'}: {blocker} is a file, not a folder")):
        TRAIN["main"](tiny_run_args(blocker / "run", cache_dir))
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(image)
    model = save_model(tmp_path / "model")
    assert PREDICT.main(["--model", str(model), str(image), "--output_dir", str(blocker / "out")]) == 1
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err


def test_resume_with_another_config_is_one_line_naming_the_mismatch(finished_run: Path, cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path)
    args = tiny_run_args(out, cache_dir, "--resume_from_checkpoint", "latest", "--config_overrides", "num_queries=20",
                         steps=3)
    with pytest.raises(ValueError, match=r"^cannot resume with --config_overrides num_queries=20: the run used "
                                         r"--config_overrides unset \(.*training_args.json\)"):
        TRAIN["main"](args)  # the options against the run's record (issue 25), before anything is built
    (out / "training_args.json").unlink()  # a run without its record: the checkpoint itself refuses the model
    fresh_accelerate_state_reset()
    with pytest.raises(ValueError) as error:
        TRAIN["main"](args)
    message = str(error.value)
    assert "\n" not in message and "checkpoint-2: it does not fit this model" in message
    assert "size mismatch for model.query_position_embeddings.weight" in message and "--config_overrides" in message


def test_train_script_reports_its_errors_in_one_line_and_tracebacks_only_with_debug(tmp_path: Path, monkeypatch,
                                                                                    capsys) -> None:
    argv = ["train.py", "--per_device_train_batch_size", "0", "--output_dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: --per_device_train_batch_size must be >= 1; got 0\n"
    monkeypatch.setattr(sys, "argv", argv + ["--debug"])
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")


def test_targets_that_are_not_integer_id_and_box_tensors_are_one_clear_error():
    model = DetrCustomForObjectDetection(tiny_config())
    pixel_values, pixel_mask = padded_batch()
    good = {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    as_lists = {"class_labels": [1], "boxes": [[0.5, 0.5, 0.2, 0.2]]}
    with pytest.raises(ValueError,
                       match=r"labels\[1\]: 'class_labels' and 'boxes' must be torch tensors .* got list and list"):
        model(pixel_values, pixel_mask, labels=[good, as_lists])
    float_ids = {**good, "class_labels": torch.tensor([1.0])}
    with pytest.raises(ValueError,
                       match=r"labels\[0\]\['class_labels'\] must be integer class ids; got dtype torch.float32"):
        model(pixel_values, pixel_mask, labels=[float_ids, good])
