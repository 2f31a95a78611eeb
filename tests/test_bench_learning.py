"""benchmarks/bench_learning.py: the median over seeds and the trained-backbone start (`--backbone_from`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config
from safetensors.torch import save_file

from modeling_detr_custom import DetrCustomForObjectDetection

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_learning import median, write_backbone  # noqa: E402


def test_median_counts_a_run_that_never_reached_the_target_as_the_latest() -> None:
    assert median([3072, 2816, 3328]) == 3072
    assert median([2816, None, 3072]) == 3072  # None sorts last, so it is not the middle run
    assert median([2816, None, None]) is None  # the middle run never got there
    assert median([2816, 3072]) == 2944


def saved_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    DetrCustomForObjectDetection(tiny_config()).save_pretrained(folder)
    return folder / "model.safetensors"


def test_backbone_from_a_saved_model_loads_as_the_backbone_weights(tmp_path: Path) -> None:
    source = saved_model(tmp_path / "trained", seed=1)
    file = write_backbone(source, tmp_path)
    fresh = DetrCustomForObjectDetection(tiny_config())
    fresh.load_pretrained_backbone(file)
    trained = DetrCustomForObjectDetection.from_pretrained(source.parent)
    for (name, want), got in zip(trained.model.backbone.body.state_dict().items(),
                                 fresh.model.backbone.body.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert write_backbone(source, tmp_path) == file  # the same backbone again: kept


def test_backbone_from_refuses_another_backbone_in_the_same_folder_and_a_file_without_one(tmp_path: Path) -> None:
    write_backbone(saved_model(tmp_path / "a", seed=1), tmp_path)
    with pytest.raises(ValueError, match="another backbone"):
        write_backbone(saved_model(tmp_path / "b", seed=2), tmp_path)
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a detr-custom model"):
        write_backbone(tmp_path / "other.safetensors", tmp_path / "a")
