"""Fine-tuning a saved model onto a new label set (issue 24): what the class head keeps, and which recipe is used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import padded_batch, tiny_config

from modeling_detr_custom.configuration_detr_custom import DetrCustomConfig
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.training.arguments import finetune_recipe_line, parse_train_args, resolve_options
from modeling_detr_custom.training.factories import load_for_finetuning, make_train_transform
from modeling_detr_custom.training.presets import MODEL_PRESETS

OLD = {0: "circle", 1: "square", 2: "triangle"}
NEW = {0: "square", 1: "bar", 2: "circle", 3: "triangle"}
OLD_ROW_OF_NEW = {0: 1, 2: 0, 3: 2}  # square, circle, triangle: new index -> old index


def saved_source(folder: Path) -> DetrCustomForObjectDetection:
    """A tiny model with classes [circle, square, triangle] whose class-head rows lie far outside the head's init
    (|w| <= 1/sqrt(d_model)), so a kept row cannot be mistaken for a fresh one."""
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(tiny_config(id2label=OLD)).eval()
    with torch.no_grad():
        head = model.class_labels_classifier
        head.weight.copy_(torch.randn_like(head.weight) + 3.0)
        head.bias.copy_(torch.arange(head.bias.numel(), dtype=torch.float32) + 5.0)
    model.save_pretrained(folder)
    return model


def finetuned(folder: Path) -> DetrCustomForObjectDetection:
    return load_for_finetuning(str(folder), dict(NEW), None, label_to_category_id={i: i + 1 for i in NEW},
                               contiguous_labels=True).eval()


def test_known_classes_keep_their_class_head_rows_at_their_new_index(tmp_path: Path, caplog) -> None:
    source = saved_source(tmp_path / "source")
    with caplog.at_level("INFO", logger="modeling_detr_custom"):
        model = finetuned(tmp_path / "source")
    old, new = source.class_labels_classifier, model.class_labels_classifier
    assert new.weight.shape == (len(NEW) + 1, old.in_features)
    for i, j in OLD_ROW_OF_NEW.items():
        assert torch.equal(new.weight[i], old.weight[j]) and torch.equal(new.bias[i], old.bias[j]), NEW[i]
    assert torch.equal(new.weight[-1], old.weight[-1]) and torch.equal(new.bias[-1], old.bias[-1]), "no object"
    bound = 1 / math.sqrt(old.in_features)  # nn.Linear's init: U(-bound, bound) for weight and bias
    bar_weight, bar_bias = new.weight[1], new.bias[1]
    assert bar_weight.abs().max() <= bound and bar_bias.abs() <= bound and bar_weight.std() > bound / 4, \
        "'bar' gets a fresh row from the head's init"
    kept = "keeps the rows of the no-object class and of 3 known by name ['square', 'circle', 'triangle']"
    assert kept in caplog.text
    assert "1 new start fresh ['bar']" in caplog.text


def test_known_classes_score_the_same_right_after_loading(tmp_path: Path) -> None:
    source = saved_source(tmp_path / "source")
    model = finetuned(tmp_path / "source")
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        before = source(pixel_values, pixel_mask=pixel_mask)
        after = model(pixel_values, pixel_mask=pixel_mask)
    new_columns, old_columns = [*OLD_ROW_OF_NEW, len(NEW)], [*OLD_ROW_OF_NEW.values(), len(OLD)]
    torch.testing.assert_close(after.logits[..., new_columns], before.logits[..., old_columns], rtol=0, atol=1e-5)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, rtol=0, atol=0)


def demo_like_model(folder: Path) -> Path:
    """A model folder with the demo preset's architecture and no training record."""
    DetrCustomConfig(**MODEL_PRESETS["demo"], id2label=OLD).save_pretrained(folder)
    return folder


def resolved(*argv: str):
    return resolve_options(parse_train_args(["--output_dir", "x", "--coco_dir", "data", *argv]))


def test_a_finetune_takes_the_recipe_of_the_model_it_loads_and_explicit_options_win(tmp_path: Path) -> None:
    model = str(demo_like_model(tmp_path / "demo_like"))
    args = resolved("--model_name_or_path", model)
    assert (args.model_config, args.per_device_train_batch_size, args.augmentation, args.image_size,
            args.learning_rate) == ("demo", 8, False, 64, 4e-4), "the demo's recipe"
    assert args.warmup_steps == 100, "the warmup, batch and lr the demo's fine-tune recipe was measured with"
    assert (args.fliplr, args.flipud, args.channel_shuffle, args.num_train_epochs, args.lr_drop_epochs) == \
        (0.5, 0.5, 1.0, 48, 40), "and the demo fine-tune's flips, colour shuffle and longer schedule"
    line = finetune_recipe_line(args)
    assert line.startswith("fine-tune recipe: the demo preset's fine-tune, the model's own (its config.json has the "
                           "demo preset's architecture): batch 8, lr 0.0004"), line
    explicit = resolved("--model_name_or_path", model, "--per_device_train_batch_size", "2", "--augmentation",
                        "--warmup_steps", "50", "--image_size", "96")
    assert (explicit.per_device_train_batch_size, explicit.augmentation, explicit.warmup_steps,
            explicit.image_size, explicit.learning_rate) == (2, True, 50, 96, 4e-4)
    no_flip = resolved("--model_name_or_path", model, "--flipud", "0", "--channel_shuffle", "0.25")
    assert (no_flip.fliplr, no_flip.flipud, no_flip.channel_shuffle) == (0.5, 0.0, 0.25)
    assert "fliplr 0.5, flipud 0, channel_shuffle 0.25" in finetune_recipe_line(no_flip)
    r50 = resolved("--model_name_or_path", model, "--model_config", "r50")
    assert (r50.model_config, r50.per_device_train_batch_size, r50.augmentation, r50.image_size) == \
        ("r50", 2, True, 800)
    assert "--model_config r50's as given (the model's own: demo)" in finetune_recipe_line(r50)
    assert (r50.fliplr, r50.flipud, r50.channel_shuffle) == (0.5, 0.0, 0.0), "DETR's flip only, as the paper"
    assert resolved().model_config == "r50", "a run from scratch on a dataset keeps the r50 recipe"


def test_the_recipe_comes_from_the_training_record_else_the_current_default(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tiny_config(d_model=48, id2label=OLD).save_pretrained(folder)  # no preset's architecture
    unknown = resolved("--model_name_or_path", str(folder))
    assert (unknown.model_config, unknown.per_device_train_batch_size, unknown.warmup_steps) == ("r50", 2, 0)
    assert "cannot tell the model's preset (it has no training_args.json naming a preset and its config.json " \
           "matches no preset's architecture): preset r50's" in finetune_recipe_line(unknown)
    (folder / "training_args.json").write_text(json.dumps({"model_config": "demo", "learning_rate": 4e-4}))
    recorded = resolved("--model_name_or_path", str(folder))
    assert (recorded.model_config, recorded.per_device_train_batch_size, recorded.warmup_steps) == ("demo", 8, 100)
    assert "the model's own (its training_args.json records --model_config demo)" in finetune_recipe_line(recorded)


@pytest.mark.parametrize("preset", ["tiny", "r50"])
def test_every_preset_is_recognised_by_its_architecture(tmp_path: Path, preset: str) -> None:
    DetrCustomConfig(**MODEL_PRESETS[preset], id2label=OLD).save_pretrained(tmp_path)
    assert resolved("--model_name_or_path", str(tmp_path)).model_config == preset


def test_flip_and_colour_defaults_follow_the_augmentation_and_stay_off_for_the_demo() -> None:
    demo = resolve_options(parse_train_args(["--output_dir", "x"]))
    assert (demo.augmentation, demo.fliplr, demo.flipud, demo.channel_shuffle) == (False, 0.0, 0.0, 0.0)
    assert make_train_transform(demo) is None, "the demo from scratch: only the processor's resize, as before"
    with_detr = resolve_options(parse_train_args(["--output_dir", "x", "--augmentation"]))
    assert with_detr.fliplr == 0.5, "--augmentation is DETR's, flip included"
    flips = resolve_options(parse_train_args(["--output_dir", "x", "--flipud", "0.5", "--channel_shuffle", "1"]))
    assert [type(t).__name__ for t in make_train_transform(flips).transforms] == \
        ["RandomVerticalFlip", "RandomChannelShuffle"]
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=f"--flipud is a probability in \\[0, 1\\]; got {bad}"):
            resolve_options(parse_train_args(["--output_dir", "x", "--flipud", bad]))
