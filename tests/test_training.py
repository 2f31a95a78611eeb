"""Training loop, checkpoints/resume, evaluation and bad data (issue 4); fast, tiny configs.

Slow ones (overfit, pipeline on the trained folder, SIGTERM) are in test_training_slow.py. Runs
here are in-process (`scripts/train.py`'s `main`) to avoid paying the imports of a fresh
interpreter for each, except the two-process test, which needs `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file

from modeling_detr_custom.coco_metric import coco_box_ap
from modeling_detr_custom.data import (
    DetrCollator,
    EpochShuffleSampler,
    load_coco_folder_with_info,
    make_synthetic_coco,
    make_train_transforms,
    metric_references,
    scaled_train_transform_kwargs,
    without_image_decoding,
)
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.training import (
    NonFiniteLossError,
    apply_config_overrides,
    evaluate_coco,
    gather_predictions,
    list_checkpoints,
    lr_factor,
    make_eval_dataloader,
    param_groups,
    resolve_checkpoint,
    rotate_checkpoints,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN = runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="train_script")
EVALUATE = runpy.run_path(str(REPO / "scripts" / "evaluate_model.py"), run_name="evaluate_script")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps singletons between them.

    One torch thread meanwhile: tiny models gain nothing from a second one, and on a busy 2-core
    machine two threads were 4-7x slower (benchmarks/bench_train.py)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_run_args(output_dir: Path, cache_dir: Path, *extra: str, steps: int = 3) -> list[str]:
    """A tiny DETR on 8 synthetic 64 px images, batch 2 (4 steps per epoch)."""
    return ["--model_config", "tiny", "--synthetic_num_train", "8", "--synthetic_num_val", "3",
            "--synthetic_image_size", "64", "--image_size", "64", "--cache_dir", str(cache_dir),
            "--output_dir", str(output_dir), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--picture_images", "2", *extra]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def write_coco(folder: Path, split: str, images: list[dict], annotations: list[dict], categories=None) -> Path:
    """A COCO split from explicit image dicts ({"file_name", "width", "height", "rects": [...]}) written as PNGs."""
    image_dir = folder / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, spec in enumerate(images, start=1):
        if spec.get("write", True):
            im = Image.new("RGB", (spec["width"], spec["height"]), (30, 30, 30))
            draw = ImageDraw.Draw(im)
            for x, y, w, h in spec.get("rects", []):
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(230, 40, 40))
            im.save(image_dir / spec["file_name"])
        entries.append({"id": spec.get("id", i), "file_name": spec["file_name"], "width": spec["width"],
                        "height": spec["height"]})
    categories = categories or [{"id": 1, "name": "box"}, {"id": 3, "name": "other"}]
    path = folder / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def ann(ann_id: int, image_id: int, bbox, category_id: int = 1) -> dict:
    return {"id": ann_id, "image_id": image_id, "bbox": list(bbox), "category_id": category_id,
            "area": float(bbox[2] * bbox[3]), "iscrowd": 0}


def mixed_size_coco(folder: Path) -> Path:
    """Val split with three images of different sizes (padding in a batch), one or two boxes each."""
    images = [{"file_name": "a.png", "width": 96, "height": 64, "rects": [(10, 8, 30, 20)]},
              {"file_name": "b.png", "width": 64, "height": 80, "rects": [(5, 40, 20, 30), (40, 4, 16, 16)]},
              {"file_name": "c.png", "width": 72, "height": 72, "rects": [(20, 20, 40, 36)]}]
    anns = [ann(1, 1, (10, 8, 30, 20)), ann(2, 2, (5, 40, 20, 30), 3), ann(3, 2, (40, 4, 16, 16)),
            ann(4, 3, (20, 20, 40, 36))]
    write_coco(folder, "val", images, anns)
    write_coco(folder, "train", images, anns)
    return folder


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- data order and augmentation


def test_sampler_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(20, seed=42), EpochShuffleSampler(20, seed=42)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.set_epoch(4)
    assert list(a) != list(b), "each epoch must shuffle differently"
    assert list(EpochShuffleSampler(20, seed=43)) != list(EpochShuffleSampler(20, seed=42))
    assert not hasattr(a, "generator"), "accelerate would try to synchronise a sampler generator"


def test_augmentation_depends_only_on_seed_epoch_and_image(tmp_path: Path) -> None:
    """Same (seed, epoch, image) -> same pixels and boxes whatever the batch holds: the basis of exact
    resume and of 2 processes x 1 image == 1 process x 2 images with augmentation."""
    make_synthetic_coco(tmp_path, num_train=3, num_val=1, image_size=64, seed=3)
    data = load_coco_folder_with_info(tmp_path, cache_dir=str(tmp_path / "cache"))
    rows = without_image_decoding(data.dataset["train"])
    processor = DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 107})
    collator = DetrCollator(processor, make_train_transforms(**scaled_train_transform_kwargs(64)), seed=7)
    alone = collator([rows[1]])
    together = collator([rows[0], rows[1], rows[2]])
    h, w = alone["labels"][0]["size"].tolist()
    assert torch.equal(together["pixel_values"][1, :, :h, :w], alone["pixel_values"][0, :, :h, :w])
    assert torch.equal(together["labels"][1]["boxes"], alone["labels"][0]["boxes"])
    outputs = []
    for epoch in range(6):
        collator.set_epoch(epoch)
        outputs.append(collator([rows[1]])["pixel_values"])
    assert any(o.shape != outputs[0].shape or not torch.equal(o, outputs[0]) for o in outputs[1:])


# ----------------------------------------------------------------------------- optimisation


def test_lr_schedule_is_steplr_in_epochs_with_warmup() -> None:
    assert lr_factor(0, 0, lr_drop_epochs=200, warmup_steps=0) == 1.0
    assert lr_factor(10_000, 199, 200, 0) == 1.0
    assert lr_factor(10_000, 200, 200, 0) == pytest.approx(0.1)
    assert lr_factor(10_000, 400, 200, 0) == pytest.approx(0.01)
    assert lr_factor(10_000, 400, None, 0) == lr_factor(5, 3, 0, 0) == 1.0
    assert [lr_factor(s, 0, None, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_r50_recipe_is_the_original_and_the_demo_warmup_is_its_own() -> None:
    from modeling_detr_custom.training.arguments import parse_train_args, resolve_options

    r50 = resolve_options(parse_train_args(["--output_dir", "x", "--model_config", "r50"]))
    lr = (r50.learning_rate, r50.backbone_learning_rate, r50.warmup_steps, r50.lr_drop_epochs, r50.num_train_epochs)
    assert lr == (1e-4, 1e-5, 0, 200, 300), "the original: no warmup, x0.1 at epoch 200 of 300"
    assert (r50.weight_decay, r50.max_grad_norm, r50.per_device_train_batch_size) == (1e-4, 0.1, 2)
    demo = resolve_options(parse_train_args(["--output_dir", "x"]))
    assert (demo.model_config, demo.per_device_train_batch_size, demo.learning_rate, demo.warmup_steps,
            demo.num_train_epochs, demo.lr_drop_epochs) == ("demo", 16, 5.7e-4, 500, 20, 17)
    assert resolve_options(parse_train_args(["--output_dir", "x", "--warmup_steps", "0"])).warmup_steps == 0


def test_auto_threads_take_the_idle_cores_and_a_blip_of_load_does_not_cost_a_core(monkeypatch) -> None:
    import psutil

    from modeling_detr_custom.training import job

    def threads(busy_samples: list[float], cores: int = 2, local_processes: int = 1) -> int:
        samples = iter(busy_samples)
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval: next(samples))
        monkeypatch.setattr(job, "usable_cores", lambda: cores)
        return job.resolve_num_threads("auto", local_processes)

    assert threads([0, 0, 0]) == 2, "an idle 2-core machine: both cores"
    assert threads([70, 3, 40]) == 2, "another process busy during one sample only: still both"
    assert threads([55, 60, 52]) == 1, "a job keeping one core busy throughout: one thread"
    assert threads([100, 100, 100]) == 1, "never 0"
    assert threads([0, 0, 0], cores=16) == 4, "at most 4"
    assert threads([0, 0, 0], cores=4, local_processes=2) == 2, "the idle cores shared among the processes"
    assert job.resolve_num_threads("3") == 3 and job.resolve_num_threads(0) == torch.get_num_threads()


def test_param_groups_backbone_lr_and_frozen_stem() -> None:
    model = DetrCustomForObjectDetection(tiny_config())
    groups = param_groups(model, 1e-4, 1e-5, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    transformer, backbone = groups
    assert (transformer["lr"], backbone["lr"]) == (1e-4, 1e-5)
    assert all(names[id(p)].startswith("model.backbone.") for p in backbone["params"])
    assert not any(names[id(p)].startswith("model.backbone.") for p in transformer["params"])
    grouped = {id(p) for g in groups for p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if id(p) not in grouped]
    assert frozen and all(n.startswith("model.backbone.") for n in frozen), "the stem and layer1 stay frozen"
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    fresh = DetrCustomForObjectDetection(tiny_config())
    assert len(param_groups(fresh, 1e-4, 0.0, 1e-4)) == 1, "backbone lr 0 freezes the backbone"
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if n.startswith("model.backbone."))


def test_config_overrides_typed_and_checked() -> None:
    config = tiny_config()
    apply_config_overrides(config, "d_model=64,num_queries=20,auxiliary_loss=false,dropout=0.0")
    assert (config.d_model, config.num_queries, config.auxiliary_loss, config.dropout) == (64, 20, False, 0.0)
    with pytest.raises(ValueError, match="no_such_field"):
        apply_config_overrides(config, "no_such_field=1")
    with pytest.raises(ValueError, match="d_model=abc"):
        apply_config_overrides(config, "d_model=abc")
    with pytest.raises(ValueError, match="divisible"):
        apply_config_overrides(config, "d_model=66")


def test_options_from_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "o.yaml").write_text("learning_rate: 3.0e-4\nmax-steps: 7\nno_augmentation: true\n")
    args = TRAIN["parse_args"](["--config", str(tmp_path / "o.yaml"), "--max_steps", "9"])
    assert (args.learning_rate, args.max_steps, args.augmentation) == (3e-4, 9, False), "command line wins"
    (tmp_path / "o.json").write_text(json.dumps({"seed": 5, "config_overrides": "d_model=64"}))
    args = TRAIN["parse_args"](["--config", str(tmp_path / "o.json")])
    assert (args.seed, args.config_overrides) == (5, "d_model=64")
    (tmp_path / "bad.yaml").write_text("learnig_rate: 1\n")
    with pytest.raises(ValueError, match="learnig_rate"):
        TRAIN["parse_args"](["--config", str(tmp_path / "bad.yaml")])


def test_bad_option_values_are_clear_errors(tmp_path: Path, cache_dir: Path) -> None:
    for extra, match in ((["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
                         (["--coco_dir", "x", "--dataset_path", "y"], "at most one"),
                         (["--backbone_weights", str(tmp_path / "missing.pth")], "backbone_weights"),
                         (["--model_config", "r51"], "r51")):
        with pytest.raises(ValueError, match=match):
            TRAIN["main"](tiny_run_args(tmp_path / "out", cache_dir, *extra))


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_listing_ignores_incomplete_and_rotates(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (3, 10, 7):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "training_state.json").write_text("{}")
    (root / "checkpoint-12").mkdir()  # killed while saving: no training state
    (root / ".tmp-checkpoint-13").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-7", "checkpoint-10"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-10"
    assert resolve_checkpoint("latest", tmp_path / "elsewhere") is None, "latest with none yet = fresh start"
    with pytest.raises(ValueError, match="checkpoint-12"):
        resolve_checkpoint(str(root / "checkpoint-12"), tmp_path)
    rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-7", "checkpoint-10"]


# ----------------------------------------------------------------------------- evaluation


class Oracle(torch.nn.Module):
    """Predicts the ground truth of each batch (taken from the same loader) plus low-score junk queries."""

    def __init__(self, batches: list[list[dict]], num_labels: int, num_queries: int = 5) -> None:
        super().__init__()
        self.batches, self.num_labels, self.num_queries = list(batches), num_labels, num_queries
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, pixel_mask):
        labels = self.batches.pop(0)
        logits = torch.full((len(labels), self.num_queries, self.num_labels + 1), -10.0)
        logits[..., -1] = 10.0  # "no object" everywhere but on the matched queries
        boxes = torch.full((len(labels), self.num_queries, 4), 0.5)
        for i, target in enumerate(labels):
            n = len(target["class_labels"])
            logits[i, torch.arange(n), target["class_labels"]] = 10.0
            logits[i, :n, -1] = -10.0
            boxes[i, :n] = target["boxes"]
        return type("Out", (), {"logits": logits, "pred_boxes": boxes})()


class OneProcess:
    num_processes, is_main_process = 1, True

    def autocast(self):
        return contextlib.nullcontext()


def test_perfect_predictions_through_the_eval_pipeline_give_ap_1(tmp_path: Path) -> None:
    """Boxes normalised by each UNPADDED size, padded batches of mixed sizes, raw category ids with gaps:
    an oracle through processor -> post-processing -> metric must score 1.0."""
    data = load_coco_folder_with_info(mixed_size_coco(tmp_path / "coco"), cache_dir=str(tmp_path / "cache"))
    dataset = without_image_decoding(data.dataset["val"])
    processor = DetrCustomImageProcessor(size={"shortest_edge": 48, "longest_edge": 80})
    loader = make_eval_dataloader(dataset, processor, batch_size=2)
    oracle = Oracle([batch["labels"] for batch in loader], num_labels=len(data.label_mapping.names))
    mapping = data.label_mapping.label_to_category_id
    result = evaluate_coco(oracle, loader, processor, OneProcess(), metric_references(dataset, mapping), mapping)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == 1.0 and result["num_images"] == 3


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_metric_agrees_with_pycocotools_and_counts_each_image_once(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path, num_train=1, num_val=12, image_size=64, seed=5, category_ids=(1, 3, 7))
    gt_file = tmp_path / "annotations" / "instances_val.json"
    gt = _quiet(COCO, str(gt_file))
    rng = np.random.default_rng(0)
    predictions, detections = [], []
    for image_id in gt.getImgIds():
        boxes, scores, labels = [], [], []
        for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) + [None, None]:
            x, y, w, h = a["bbox"] if a else rng.uniform(0, 40, 4)
            box = [x + rng.normal(0, 2), y + rng.normal(0, 2),
                   x + max(w, 2) + rng.normal(0, 2), y + max(h, 2) + rng.normal(0, 2)]
            label = a["category_id"] if a and rng.random() < 0.8 else int(rng.choice([1, 3, 7]))
            score = float(rng.uniform(0.05, 1))
            boxes.append(box), scores.append(score), labels.append(label)
            detections.append({"image_id": image_id, "category_id": label, "score": score,
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        predictions.append({"image_id": image_id, "boxes": boxes, "scores": scores, "labels": labels})
    evaluator = COCOeval(gt, _quiet(gt.loadRes, detections), "bbox")
    for step in ("evaluate", "accumulate", "summarize"):
        _quiet(getattr(evaluator, step))
    # distributed padding: the last images repeated, as accelerate's even batches do
    padded = predictions + predictions[:3]
    ours = coco_box_ap(gather_predictions(padded, OneProcess()) + predictions[:2], coco_gt=gt_file)
    assert ours["AP"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert ours["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
    assert ours["num_images"] == 12
    assert 0.1 < ours["AP"] < 0.95, "a meaningful, imperfect score"


# ----------------------------------------------------------------------------- end to end


def test_train_end_to_end_writes_a_loadable_folder(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "run"
    results = TRAIN["main"](tiny_run_args(out, cache_dir, "--checkpointing_steps", "1",
                                          "--checkpoints_total_limit", "2",
                                          "--report_to", "tensorboard"))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "global_step", "num_processes"):
        assert key in results
    assert read_json(out / "all_results.json") == json.loads(json.dumps(results))
    assert results["global_step"] == 3 and results["num_processes"] == 1 and results["eval_num_images"] == 3
    lines = read_jsonl(out / "metrics.jsonl")
    assert [d["step"] for d in lines if "train_loss_ce" in d] == [1, 2, 3]
    assert all(math.isfinite(d["train_loss_ce"]) and d["lr"] == 1e-4 and d["lr_backbone"] == 1e-5
               for d in lines if "lr" in d)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"], "keeps the newest 2"
    assert Image.open(out / "detections.png").size[0] >= 2 * 256
    config = read_json(out / "config.json")
    assert config["auto_map"]["AutoModelForObjectDetection"] == "modeling_detr_custom.DetrCustomForObjectDetection"
    assert config["label_to_category_id"] == {"1": 1, "2": 2, "3": 3} and config["id2label"]["0"] == "N/A"
    assert read_json(out / "preprocessor_config.json")["auto_map"]["AutoImageProcessor"].endswith(
        "DetrCustomImageProcessor")
    for name in ("modeling_detr_custom.py", "configuration_detr_custom.py", "loss_detr_custom.py",
                 "image_processing_detr_custom.py"):
        assert (out / name).is_file()
    assert not (out / "training").exists() and not (out / "loop.py").exists(), "training is not remote code"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "--report_to tensorboard logs"
    # scripts/evaluate_model.py on the same data gives the training's final evaluation
    metrics_file = tmp_path / "eval.json"
    evaluated = EVALUATE["main"](["--model", str(out), "--cache_dir", str(cache_dir), "--synthetic_num_train", "8",
                                  "--synthetic_num_val", "3", "--synthetic_image_size", "64",
                                  "--output_file", str(metrics_file)])
    assert read_json(metrics_file)["AP"] == evaluated["AP"]
    for key in ("AP", "AP50", "AR100"):
        assert evaluated[key] == pytest.approx(results[key], abs=1e-9)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    """Augmentation, dropout, a warmup and an lr drop on, a resume in the middle of epoch 0 and a run
    across the epoch boundary, 2 dataloader workers in the uninterrupted run and none in the other:
    still the same parameters (augmentation is seeded per image, RNG states are restored, the lr is
    a function of the step)."""
    common = ("--lr_drop_epochs", "1", "--warmup_steps", "2", "--checkpointing_epochs", "0", "--picture_images", "0")
    TRAIN["main"](tiny_run_args(tmp_path / "full", cache_dir, *common, "--dataloader_num_workers", "2", steps=6))
    fresh_accelerate_state_reset()
    TRAIN["main"](tiny_run_args(tmp_path / "split", cache_dir, *common, steps=3))
    state = read_json(tmp_path / "split" / "checkpoints" / "checkpoint-3" / "training_state.json")
    assert (state["global_step"], state["epoch"], state["batches_in_epoch"]) == (3, 0, 3)
    fresh_accelerate_state_reset()
    TRAIN["main"](tiny_run_args(tmp_path / "split", cache_dir, *common, "--resume_from_checkpoint", "latest", steps=6))
    full, resumed = (load_file(tmp_path / "full" / "model.safetensors"),
                     load_file(tmp_path / "split" / "model.safetensors"))
    start = load_file(tmp_path / "split" / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    assert max((full[k] - start[k]).abs().max().item() for k in full) > 1e-4, "steps 4-6 changed the weights"
    lrs = [d["lr"] for d in read_jsonl(tmp_path / "split" / "metrics.jsonl") if "lr" in d]
    assert lrs == pytest.approx([5e-5, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5]), "warmup, then x0.1 from epoch 1 (step 5)"


def fresh_accelerate_state_reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    original = DetrCustomForObjectDetection.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] == 3:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(DetrCustomForObjectDetection, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3.*checkpoint-2"):
        TRAIN["run_training"](TRAIN["parse_args"](tiny_run_args(out, cache_dir, "--checkpointing_steps", "1", steps=5)))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors"), "the last good state is intact"
    assert not (out / "model.safetensors").exists() and not (out / "all_results.json").exists()
    assert read_jsonl(out / "metrics.jsonl")[-1]["event"] == "non_finite_loss"


def bad_data_coco(folder: Path) -> Path:
    """Train split with every kind of bad data the issue lists, plus good images to train on."""
    good = [{"file_name": f"g{i}.png", "width": 64, "height": 64, "rects": [(8 + i, 10, 24, 20)]} for i in range(4)]
    bad = [{"file_name": "missing.png", "width": 64, "height": 64, "write": False},
           {"file_name": "corrupt.png", "width": 64, "height": 64, "write": False},
           {"file_name": "empty.png", "width": 64, "height": 64},  # no annotations: a negative image
           {"file_name": "truncated.png", "width": 64, "height": 64, "rects": [(4, 4, 30, 30)]}]
    images = good + bad
    anns = [ann(i + 1, i + 1, (8 + i, 10, 24, 20)) for i in range(4)]
    anns += [ann(10, 1, (50, 50, 30, 30)),  # partly outside the image: clipped
             ann(11, 2, (10, 10, 0, 12)),  # zero area: dropped
             ann(12, 3, (10, 30, 10, 10), category_id=99),  # unknown category: dropped
             ann(13, 5, (1, 1, 5, 5)), ann(14, 6, (1, 1, 5, 5)), ann(15, 8, (4, 4, 30, 30))]
    write_coco(folder, "train", images, anns)
    write_coco(folder, "val", good[:2], anns[:2])
    (folder / "images" / "train" / "corrupt.png").write_bytes(b"not an image at all")
    truncated = folder / "images" / "train" / "truncated.png"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header fine, data cut
    return folder


def test_bad_data_is_skipped_with_counts_never_a_crash(tmp_path: Path, caplog) -> None:
    coco = bad_data_coco(tmp_path / "coco")
    args = ["--model_config", "tiny", "--coco_dir", str(coco), "--image_size", "64",
            "--cache_dir", str(tmp_path / "cache"),
            "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--output_dir", str(tmp_path / "run"),
            "--backbone_weights", "none", "--picture_images", "0", "--checkpointing_epochs", "0"]
    with caplog.at_level("INFO", logger="modeling_detr_custom"):
        results = TRAIN["main"](args)
    assert results["global_step"] == 6, "6 usable images (4 good, 1 negative, 1 undecodable) -> 3 steps x 2 epochs"
    log = caplog.text
    for what in ("missing_images': 1", "corrupt_images': 1", "boxes_clipped': 1", "zero_area_boxes_dropped': 1",
                 "unknown_category_dropped': 1", "images_without_annotations': 1"):
        assert what in log, what
    assert "cannot be decoded" in log, "the truncated file is replaced and counted in the log, not a crash"
    fresh_accelerate_state_reset()
    with pytest.raises(ValueError, match="missing"):
        TRAIN["main"](args + ["--on_bad_data", "raise", "--output_dir", str(tmp_path / "run2")])


def test_finetune_from_saved_model_with_a_new_label_set(tmp_path: Path, cache_dir: Path) -> None:
    source = tmp_path / "source"
    TRAIN["main"](tiny_run_args(source, cache_dir, "--picture_images", "0", "--checkpointing_epochs", "0", steps=1))
    fresh_accelerate_state_reset()
    coco = mixed_size_coco(tmp_path / "coco")  # categories {1: box, 3: other} instead of shapes 1..3
    out = tmp_path / "finetuned"
    TRAIN["main"](["--model_name_or_path", str(source), "--coco_dir", str(coco), "--contiguous_labels", "--output_dir",
                   str(out), "--max_steps", "1", "--per_device_train_batch_size", "2", "--picture_images", "0",
                   "--cache_dir", str(tmp_path / "cache"), "--checkpointing_epochs", "0", "--mixed_precision", "bf16"])
    config = read_json(out / "config.json")
    assert config["id2label"] == {"0": "box", "1": "other"} and config["label_to_category_id"] == {"0": 1, "1": 3}
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert (after["class_labels_classifier.weight"].shape[0] == 3
            and before["class_labels_classifier.weight"].shape[0] == 5)
    assert read_json(out / "preprocessor_config.json")["size"]["shortest_edge"] == 64, "the model's image size is kept"
    shared = "model.encoder.layers.0.self_attn.in_proj_weight"
    assert shared in after and (after[shared] - before[shared]).abs().max() < 1e-2, "the rest starts from the source"


def run_script(args: list[str], env: dict | None = None, timeout: int = 600, launcher: list[str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run scripts/train.py in a fresh interpreter from outside the checkout (cwd = /)."""
    command = (launcher or [sys.executable]) + [str(REPO / "scripts" / "train.py"), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd="/", timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


# ----------------------------------------------------------------------------- 2 + 4. two processes


def distributed_args(output_dir: Path, cache_dir: Path, batch: int, steps: int) -> list[str]:
    """4 training images with exactly 2 boxes each (the CE term is a per-process mean, so equivalence
    needs equal box counts), 3 validation images (odd: accelerate pads the second process's eval
    shard with a duplicate), dropout 0, no augmentation."""
    return ["--model_config", "tiny", "--config_overrides", "dropout=0.0,attention_dropout=0.0,activation_dropout=0.0",
            "--synthetic_num_train", "4", "--synthetic_num_val", "3", "--synthetic_image_size", "64",
            "--synthetic_min_shapes", "2", "--synthetic_max_shapes", "2", "--image_size", "64", "--no_augmentation",
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "1", "--max_steps", str(steps),
            "--checkpointing_epochs", "0", "--picture_images", "0", "--logging_steps", "1",
            "--cache_dir", str(cache_dir), "--output_dir", str(output_dir),
            "--dump_first_step", str(output_dir / "first_step.pt")]


def free_port() -> int:
    """A port nobody listens on now (test runs in parallel must not share the rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_equal_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    """Two gloo processes really train (world size 2 in the results); their first step's loss and
    gradients equal one process with both images; evaluation counts each image once. ~30 s on an
    idle 2-core machine (two fresh interpreters), so it stays in the default suite."""
    cache = tmp_path / "cache"
    run_script(distributed_args(tmp_path / "one", cache, batch=2, steps=1), env={"OMP_NUM_THREADS": "1"})
    train = read_json(next(cache.glob("synthetic_coco/*")) / "annotations" / "instances_train.json")
    counts = [sum(a["image_id"] == im["id"] for a in train["annotations"]) for im in train["images"]]
    assert counts == [2, 2, 2, 2], "equivalence needs the same number of boxes in every image"
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    done = run_script(distributed_args(tmp_path / "two", cache, batch=1, steps=2), env={"ACCELERATE_USE_CPU": "1"},
                      launcher=launcher)
    results = read_json(tmp_path / "two" / "all_results.json")
    assert results["num_processes"] == 2, done.stderr[-2000:]
    assert results["global_step"] == 2 and results["total_train_batch_size"] == 2
    assert results["eval_num_images"] == 3, "the duplicate accelerate pads the eval shards with counts once"
    one, two = torch.load(tmp_path / "one" / "first_step.pt"), torch.load(tmp_path / "two" / "first_step.pt")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert sorted(one["image_ids"]) == sorted(two["image_ids"]), "the same images in the first step"
    assert abs(one["loss"] - two["loss"]) <= 1e-5
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 50
    # within 1e-5, relative to each tensor's scale where that exceeds 1: some decoder biases get
    # gradients near 100, where float32 sums taken in another order differ by ~2e-5 (2e-7 relative)
    worst = max(((one["grads"][k] - two["grads"][k]).abs().max() / one["grads"][k].abs().max().clamp(min=1)).item()
                for k in one["grads"])
    assert worst <= 1e-5, f"largest scaled gradient difference {worst}"
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-3, "gradients are not all ~0"
