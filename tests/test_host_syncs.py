"""A training step reads back from the device once: the Hungarian matcher's transfer (issue 12).

On a GPU every `.item()`, `float(tensor)`, `.tolist()` or `.cpu()` waits for the queued kernels. This CPU run
counts those calls while the loop runs: inside each training step there must be exactly one (the matcher's), and
between two logging reads the loop itself must make none.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import TRAIN, fresh_accelerate_state, read_jsonl, tiny_run_args  # noqa: F401 - autouse fixture

from modeling_detr_custom.training import loop

HOST_READS = ("item", "tolist", "cpu", "__float__")


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """Names of the host-reading Tensor methods called, in order, while the test runs."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def counting(monkeypatch, calls: list[str], function_name: str) -> list[int]:
    """Wrap ``loop.<function_name>``; returns the host reads of each of its calls."""
    per_call: list[int] = []
    original = getattr(loop, function_name)

    def wrapped(*args, **kwargs):
        before = len(calls)
        result = original(*args, **kwargs)
        per_call.append(len(calls) - before)
        return result

    monkeypatch.setattr(loop, function_name, wrapped)
    return per_call


def test_a_training_step_syncs_once_and_the_loop_only_at_logging_steps(tmp_path: Path, monkeypatch,
                                                                        host_reads: list[str]) -> None:
    steps = counting(monkeypatch, host_reads, "train_step")
    after = counting(monkeypatch, host_reads, "after_step")
    out = tmp_path / "run"
    args = tiny_run_args(out, tmp_path / "cache", "--logging_steps", "3", "--checkpointing_epochs", "0",
                         "--picture_images", "0", steps=7)
    TRAIN["main"](args)
    assert len(steps) == 7 and steps == [1] * 7, f"host reads per training step: {steps} (want the matcher's one)"
    # after_step of steps 1..7: steps 3 and 6 read the interval's loss once; the others read nothing
    assert [n > 0 for n in after] == [False, False, True, False, False, True, False], after
    assert max(after) == 1, f"a logging read must be one transfer for the whole interval; got {after}"
    logged = [row for row in read_jsonl(out / "metrics.jsonl") if "train_loss_ce" in row]
    assert [row["step"] for row in logged] == [3, 6, 7], "each interval is logged, the last partial one at the end"
