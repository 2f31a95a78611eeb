"""Shared fixtures: tiny configs on CPU keep the suite fast."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the Hub

from modeling_detr_custom import DetrCustomConfig  # noqa: E402


def tiny_config(**overrides) -> DetrCustomConfig:
    """A DETR small enough for CPU tests: timm's test_resnet, d_model 32, 1+2 layers."""
    kwargs = dict(backbone="test_resnet", d_model=32, encoder_layers=1, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, num_queries=12, id2label={0: "circle", 1: "square", 2: "triangle"})
    kwargs.update(overrides)
    return DetrCustomConfig(**kwargs)


def padded_batch(seed: int = 0, sizes=((96, 128), (64, 96))) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes zero-padded bottom/right: pixel_values (B, 3, H, W), pixel_mask (B, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def random_labels(counts, num_labels: int = 3, seed: int = 0) -> list[dict]:
    """One target dict per image with `counts[i]` boxes, normalised cxcywh inside [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for n in counts:
        wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.05
        centre = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
        labels.append({"class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                       "boxes": torch.cat([centre, wh], dim=1)})
    return labels


@pytest.fixture
def config() -> DetrCustomConfig:
    return tiny_config()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tests that guard what a transformers release can break: loading (remote code, Auto classes, pipeline),
# saving, transformers' conventions, and the list of transformers internals we use. Marked `transformers_compat`
# here, in one place: `.ci/run` runs them against the lowest transformers, timm and accelerate that
# pyproject.toml declares as well as (in the default suite) the newest; `python -m pytest -m transformers_compat`
# runs them against whatever is installed (README, "Supported versions").
TRANSFORMERS_COMPAT = (
    "tests/test_transformers_internals.py",
    "tests/test_conventions.py",
    "tests/test_remote_code.py",
    "tests/test_pipeline.py",
    "tests/test_model.py::test_save_and_load_give_bit_identical_outputs",
    "tests/test_model.py::test_non_persistent_buffers_are_rebuilt_after_loading",
    "tests/test_model.py::test_base_model_loads_from_a_detector_checkpoint",
    "tests/test_model.py::test_pretrained_backbone_loads_from_a_local_file",
    "tests/test_group_detr.py::test_save_load_round_trip_and_loading_across_group_counts",
    "tests/test_image_processor.py::test_save_pretrained_round_trip",
    "tests/test_image_processor.py::test_loads_through_auto_image_processor_as_remote_code",
    "tests/test_packaging.py::test_save_pretrained_writes_exactly_the_four_remote_code_files",
    "tests/test_training.py::test_train_end_to_end_writes_a_loadable_folder",
    "tests/test_training.py::test_resume_gives_the_same_parameters_as_an_uninterrupted_run",
    "tests/test_training.py::test_finetune_from_saved_model_with_a_new_label_set",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items) -> None:
    for item in items:
        test = item.nodeid.split("[")[0]
        if test in TRANSFORMERS_COMPAT or test.split("::")[0] in TRANSFORMERS_COMPAT:
            item.add_marker(pytest.mark.transformers_compat)
