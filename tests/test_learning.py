"""The demo model still learns: a guard for regressions that every shape test misses.

0fb0b69 changed the initialisation of the feed-forward layers (xavier, the original's) and the
README's demo fell from AP50 0.53 to 0.05 while all 181 tests passed. Its training loss had
already stalled after a few hundred steps: over steps 500-700 the demo's loss (final layer,
CE + 5 L1 + 2 GIoU) averaged 4.08-4.10 at 0fb0b69 (2 seeds) and 3.69-3.76 with the demo model at
lr 2e-4 without warmup (3 seeds), on the demo's 2,048 images. This test trains the real demo preset
(model, thread setting; batch 8, the calibration's), exactly as `scripts/train.py` does, for 700 steps on 1,024
synthetic images and asserts that the loss dropped below a threshold between the two.

It pins that calibrated lr schedule and batch (`RECIPE`, the demo's recipe until the warmup came in): the demo's
own recipe (lr 4e-4 after a warmup, 2,000 steps when this was measured; batch 16 and lr 5.7e-4 after 500 since) is
still warming up at step 700 and averaged about 4.11 there, learning but not yet separable from a stall in 60 s.
The recipe itself is guarded end to end by tests/test_demo.py. Today's stride-8 demo model does not stall with the
xavier init (3.696 against 3.686 over steps 500-700 with this recipe), so it is 0fb0b69's stall, not that init, that
this catches.

About 55 s on 2 idle cores; run against 0fb0b69's tree it fails.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 700
WINDOW = (500, 700)  # steps whose mean loss is checked: the demo learns fast here, a regression stalls
MAX_MEAN_LOSS = 3.9
RECIPE = ("--learning_rate", "2e-4", "--backbone_learning_rate", "2e-4", "--warmup_steps", "0",
          "--per_device_train_batch_size", "8")


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def total_loss(row: dict) -> float:
    """The final layer's weighted loss, from a metrics.jsonl row (the demo's loss coefficients: 1, 5, 2)."""
    return row["train_loss_ce"] + 5 * row["train_loss_bbox"] + 2 * row["train_loss_giou"]


def test_demo_model_loss_drops_within_700_steps(tmp_path: Path, fresh_accelerate_state) -> None:
    train = runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="train_script")
    args = ["--synthetic_num_train", "1024", "--synthetic_num_val", "8", "--max_steps", str(STEPS),
            "--logging_steps", "20", "--eval_every_epochs", "1000", "--checkpointing_epochs", "0",
            "--picture_images", "0", *RECIPE,
            "--seed", "1", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run")]
    train["main"](args)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    window = [total_loss(r) for r in rows if "train_loss_ce" in r and WINDOW[0] < r["step"] <= WINDOW[1]]
    assert len(window) == (WINDOW[1] - WINDOW[0]) // 20
    mean = sum(window) / len(window)
    assert mean < MAX_MEAN_LOSS, (f"the demo model stalled: mean loss {mean:.3f} over steps {WINDOW} "
                                  f"(>= {MAX_MEAN_LOSS})")
