"""End to end: the README's main job, exactly as a new user runs it, reaches the AP50 the README states; then its
model, fine-tuned on a small dataset it never saw, reaches the AP50 the README's "Fine-tune on your own data" states.

`accelerate launch scripts/train.py --output_dir DIR` with nothing else: the demo preset, the
synthetic shapes generated from scratch (a fresh cache, as on a new machine), training and the final
evaluation. About 4-6 minutes on 2 AVX-512 cores, so it is marked `slow` and `demo` (`.ci/run` runs it on its
own, after the slow suite): `python -m pytest -m demo`. The fine-tune (about 2 more minutes) takes the recipe the
demo's model gets by default (`presets.finetune_recipe("demo")`): nothing but the data, the model and
`--contiguous_labels` on its command line, as `benchmarks/bench_finetune.py` runs it.

Each floor is the lowest validation AP50 of the measured runs minus a margin for run-to-run
noise (float rounding differs between machines, so the same seed does not give the same run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MIN_AP50 = 0.85  # README "Quickstart": the lowest of the shipped preset's runs (0.866, seed 1), rounded down
MARGIN = 0.05
# README "Fine-tune on your own data": the lowest final AP50 on `new` of 3 seeds (0.830), rounded down. Its margin
# leaves the floor at issue 24's goal, AP50 0.8: a fine-tune below it misses the goal itself.
FINETUNE_MIN_AP50, FINETUNE_MARGIN = 0.83, 0.03

pytestmark = [pytest.mark.slow, pytest.mark.demo]


def accelerate() -> str:
    launcher = shutil.which("accelerate")
    assert launcher, "accelerate's launcher is not on PATH (pip install -e '.[dev]' installs it)"
    return launcher


def run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The README's main job in a fresh cache: (its output folder, the environment it ran in)."""
    tmp = tmp_path_factory.mktemp("readme_main_job")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DETR_CUSTOM_CACHE": str(tmp / "cache")}
    out = tmp / "outputs" / "demo"
    run([accelerate(), "launch", "scripts/train.py", "--output_dir", str(out)], env)
    return out, env


def test_readme_main_job_reaches_the_readme_ap50(demo_run: tuple[Path, dict[str, str]]) -> None:
    out, _ = demo_run
    results = json.loads((out / "all_results.json").read_text())
    print(json.dumps({k: results[k] for k in ("AP", "AP50", "AP75", "global_step", "train_runtime_s")}))
    assert results["model_config"] == "demo" and results["eval_num_images"] > 0
    assert results["AP50"] >= README_MIN_AP50 - MARGIN, results
    for picture in ("detections.png", "training_curves.png"):
        assert (out / picture).stat().st_size > 0


def test_the_demo_model_fine_tunes_to_the_readme_ap50_on_new_shapes(demo_run: tuple[Path, dict[str, str]]) -> None:
    demo, env = demo_run
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_finetune import write_dataset  # the benchmark's `new` set: 256 images of ring, cross, diamond

    data = write_dataset(demo.parent / "bench_finetune", "new", 256, 64)
    out = demo.parent / "finetune_new"
    run([accelerate(), "launch", "scripts/train.py", "--coco_dir", str(data), "--contiguous_labels",
         "--model_name_or_path", str(demo), "--output_dir", str(out), "--eval_every_epochs", "8"], env)
    record = json.loads((out / "training_args.json").read_text())
    assert (record["flipud"], record["channel_shuffle"], record["num_train_epochs"]) == (0.5, 1.0, 48), \
        "the demo model's fine-tune recipe by default"
    results = json.loads((out / "all_results.json").read_text())
    print(json.dumps({k: results[k] for k in ("AP", "AP50", "AP75", "global_step", "train_runtime_s")}))
    assert results["AP50"] >= FINETUNE_MIN_AP50 - FINETUNE_MARGIN, results
