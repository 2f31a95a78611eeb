"""Configs and weights that do not fit, refused in one line where they are loaded (issue 25): a config.json with a
backbone timm does not know or a num_labels that disagrees with its id2label, weights whose class head is for
another number of classes (`checks.load_checked`), and `train.py --config_overrides backbone=<unknown>`."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config
from test_training import fresh_accelerate_state, tiny_run_args  # noqa: F401 - an autouse fixture

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.checks import load_checked


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny model (3 classes: circle, square, triangle) saved to a folder."""
    folder = tmp_path_factory.mktemp("folders") / "detr-tiny"
    torch.manual_seed(0)
    DetrCustomForObjectDetection(tiny_config()).save_pretrained(folder)
    return folder


def edited_copy(saved_model: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the saved folder whose config.json has ``changes``."""
    folder = tmp_path / "edited"
    folder.mkdir()
    for file in saved_model.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_json_with_an_unknown_backbone_is_one_line_on_load(saved_model, tmp_path):
    folder = edited_copy(saved_model, tmp_path, backbone="test_resnt")
    with pytest.raises(ValueError, match=r"^backbone 'test_resnt' is not a timm model; closest timm names: "
                                         r"'test_resnet'"):
        DetrCustomConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"backbone 'test_resnt' is not a timm model"):
        load_checked(DetrCustomForObjectDetection, folder)


def test_a_config_json_whose_num_labels_disagrees_with_id2label_is_one_line_on_load(saved_model, tmp_path):
    folder = edited_copy(saved_model, tmp_path, num_labels=5)
    with pytest.raises(ValueError, match=r"^num_labels=5 disagrees with id2label, which names 3 classes"):
        DetrCustomConfig.from_pretrained(folder)


def test_num_labels_at_load_time_asks_for_a_new_label_set_as_in_transformers(saved_model):
    """transformers' fine-tuning idiom: `from_pretrained(folder, num_labels=N, ignore_mismatched_sizes=True)` gives
    N classes named LABEL_i and a new class head; the saved count keeps the saved names."""
    config = DetrCustomConfig.from_pretrained(saved_model, num_labels=4)
    assert config.num_labels == 4 and config.id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert DetrCustomConfig.from_pretrained(saved_model, num_labels=3).id2label == {
        0: "circle", 1: "square", 2: "triangle"}
    model = load_checked(DetrCustomForObjectDetection, saved_model, num_labels=4, ignore_mismatched_sizes=True)
    assert model.class_labels_classifier.out_features == 5


def test_weights_for_another_number_of_classes_are_one_line_naming_both_counts(saved_model, tmp_path):
    config = DetrCustomConfig.from_pretrained(saved_model)
    config.id2label = {i: f"class {i}" for i in range(5)}
    config.label2id = {name: i for i, name in config.id2label.items()}
    weights = saved_model / "model.safetensors"
    expected = (rf"^{weights} has a class head for 3 classes \(\+ no object\) but the config has num_labels=5 and 5 "
                r"names in id2label; load the weights with the config saved with them, or pass "
                r"ignore_mismatched_sizes=True to start a new class head$")
    with pytest.raises(ValueError, match=expected):
        load_checked(DetrCustomForObjectDetection, saved_model, config=config)
    # the same weights beside a config.json edited to 5 classes
    folder = edited_copy(saved_model, tmp_path, id2label={str(i): f"class {i}" for i in range(5)},
                         label2id={f"class {i}": i for i in range(5)})
    with pytest.raises(ValueError, match=r"has a class head for 3 classes .* num_labels=5 and 5 names in id2label"):
        load_checked(DetrCustomForObjectDetection, folder)
    # asked for (fine-tuning on a new label set): a new head, everything else as saved
    model = load_checked(DetrCustomForObjectDetection, saved_model, config=config, ignore_mismatched_sizes=True)
    assert model.class_labels_classifier.out_features == 6
    saved = DetrCustomForObjectDetection.from_pretrained(saved_model)
    assert torch.equal(model.model.decoder.layers[0].mlp.fc1.weight, saved.model.decoder.layers[0].mlp.fc1.weight)


def test_other_weights_of_the_wrong_shape_are_one_line_naming_the_first(saved_model):
    config = DetrCustomConfig.from_pretrained(saved_model)
    config.num_queries = 20
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the config: "
                                         r"model.query_position_embeddings.weight has shape \(12, 32\) in the weights, "
                                         r"\(20, 32\) in the model \(1 tensor\(s\) differ\)"):
        load_checked(DetrCustomForObjectDetection, saved_model, config=config)


def test_train_config_overrides_with_an_unknown_backbone_end_in_one_line(tmp_path, monkeypatch, capsys):
    argv = ["train.py", *tiny_run_args(tmp_path / "run", tmp_path / "cache", "--config_overrides",
                                       "backbone=test_resnt", steps=1)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: backbone 'test_resnt' is not a timm model; closest timm names: "
                                           "'test_resnet'")
