"""EMA of the weights (issue 14, `--ema_decay`): the closed form, copied buffers, training untouched, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import (  # noqa: F401 - fresh_accelerate_state is an autouse fixture
    TRAIN,
    fresh_accelerate_state,
    fresh_accelerate_state_reset,
    read_json,
    tiny_run_args,
)

from modeling_detr_custom.training.ema import ModelEMA


def test_ema_equals_the_closed_form_and_copies_buffers() -> None:
    model = torch.nn.BatchNorm1d(3)  # weight, bias (averaged); running stats, counter (copied)
    decay, tau = 0.9, 3
    ema = ModelEMA(model, decay, tau)
    start = model.weight.detach().double().clone()
    values = [torch.tensor([1.0, -2.0, 0.5]) * (n + 1) for n in range(6)]
    expected = start.clone()
    for n, value in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.copy_(value)
            model.running_mean.copy_(value * 10)
            model.num_batches_tracked.fill_(n)
        ema.update(model)
        d = decay * (1 - math.exp(-n / tau))
        expected = d * expected + (1 - d) * value.double()
    assert torch.allclose(ema.module.weight.double(), expected, atol=1e-6)
    assert not torch.allclose(ema.module.weight, model.weight), "averaged, not copied"
    assert torch.equal(ema.module.running_mean, model.running_mean), "buffers are copied, not averaged"
    assert int(ema.module.num_batches_tracked) == 6 and ema.updates == 6
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_ema_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match=rf"--ema_decay must be in \(0, 1\).*{decay}"):
        ModelEMA(torch.nn.Linear(2, 2), decay, 10)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_ema_leaves_training_alone_is_saved_and_resumes_exactly(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    common = ("--checkpointing_epochs", "0", "--picture_images", "0", "--eval_every_epochs", "100")
    ema = ("--ema_decay", "0.9", "--ema_warmup_steps", "2")
    TRAIN["main"](tiny_run_args(tmp_path / "plain", cache, *common, steps=6))
    fresh_accelerate_state_reset()
    TRAIN["main"](tiny_run_args(tmp_path / "full", cache, *common, *ema, steps=6))
    fresh_accelerate_state_reset()
    TRAIN["main"](tiny_run_args(tmp_path / "split", cache, *common, *ema, steps=3))
    fresh_accelerate_state_reset()
    TRAIN["main"](tiny_run_args(tmp_path / "split", cache, *common, *ema, "--resume_from_checkpoint", "latest",
                                steps=6))
    plain, full, split = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "full", "split"))
    trained = load_file(tmp_path / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert max_difference(trained, plain) == 0.0, "the EMA must not change the training trajectory"
    assert max_difference(full, trained) > 1e-4, "the saved folder holds the EMA, not the last weights"
    assert max_difference(full, split) == 0.0, "a resume continues the EMA bit for bit"
    results = read_json(tmp_path / "full" / "all_results.json")
    assert results["ema"] is True and results["ema_decay"] == 0.9
    assert read_json(tmp_path / "plain" / "all_results.json")["ema"] is False


def test_the_card_says_when_the_weights_are_an_ema(tmp_path: Path) -> None:
    from modeling_detr_custom.hub.card import _training_section, read_training_info

    with_ema = _training_section(read_training_info(tmp_path, {"ema_decay": 0.9999, "learning_rate": 1e-4}, None))
    without = _training_section(read_training_info(tmp_path, {"ema_decay": None, "learning_rate": 1e-4}, None))
    assert "| weights: their moving average (EMA), decay | 0.9999 |" in with_ema
    assert "EMA" not in without and "| learning rate | 0.0001 |" in without
