"""benchmarks/bench_finetune.py: its datasets, the summary's rules, the resume rule, and a smoke run end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.configuration_detr_custom import DetrCustomConfig
from modeling_detr_custom.data.synthetic import (
    OTHER_SHAPES,
    _background,
    _draw_mask,
    _split_rng,
    _tight_bbox,
    generate_image,
    make_synthetic_coco,
)
from modeling_detr_custom.hub.folder import save_folder
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.training.presets import MODEL_PRESETS

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_finetune as bench  # noqa: E402

# sha256 of the demo generator's output as drawn before the `shapes=` / `background=` options existed (commit
# 1315d5a), by `folder_digest` / `images_digest` below: the demo's data must stay bit-identical.
DEMO_FOLDERS_DIGEST = "4d9e688c3d1884e51bd4e894cd49e79963190526437e32bc6e60176c55d68200"
DEMO_IMAGES_DIGEST = "ac0b839dbbda3b933b01cf63a393253370b43ee597f69678bd0cd24e43610ea3"


def folder_digest(folder: Path) -> str:
    """Paths, decoded pixels of the PNGs (not their compressed bytes) and the bytes of every other file."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(np.asarray(Image.open(f)).tobytes() if f.suffix == ".png" else f.read_bytes())
    return h.hexdigest()


def test_the_demo_generator_draws_exactly_what_it_drew_before(tmp_path: Path) -> None:
    h = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(40):
            for num_classes in (3, 4):
                image, specs = generate_image(_split_rng(0, split, i), image_size=64, min_shapes=1, max_shapes=3,
                                              category_ids=list(range(1, num_classes + 1)))
                h.update(np.asarray(image).tobytes())
                h.update(repr(specs).encode())
    assert h.hexdigest() == DEMO_IMAGES_DIGEST
    for fmt in ("coco", "yolo"):
        make_synthetic_coco(tmp_path / fmt, num_train=6, num_val=3, image_size=64, num_classes=4, seed=0, format=fmt)
    assert folder_digest(tmp_path) == DEMO_FOLDERS_DIGEST


@pytest.mark.parametrize("shape", OTHER_SHAPES)
def test_the_new_shapes_fill_their_box(shape: str) -> None:
    mask = _draw_mask(shape, 64, 10, 20, 21, 21)
    assert _tight_bbox(mask) == (10, 20, 21, 21), "the box is tight around the drawn pixels"
    assert 0.2 * 21 * 21 < mask.sum() < 0.9 * 21 * 21
    assert mask[30, 20] == (shape != "ring"), "a ring has a hole, the others a filled centre"
    with pytest.raises(ValueError, match="unknown shape"):
        _draw_mask("star", 64, 0, 0, 8, 8)


def test_the_datasets_are_deterministic_and_what_they_claim(tmp_path: Path) -> None:
    first = {name: bench.write_dataset(tmp_path / "a", name, 8, 4) for name in bench.DATASETS}
    again = {name: bench.write_dataset(tmp_path / "b", name, 8, 4) for name in bench.DATASETS}
    for name in bench.DATASETS:
        assert folder_digest(first[name]) == folder_digest(again[name]), name
    names = {name: [c["name"] for c in json.loads((folder / "annotations" / "instances_train.json").read_text())
                    ["categories"]] for name, folder in first.items()}
    assert names == {"new": ["ring", "cross", "diamond"], "plus_one": ["circle", "square", "triangle", "bar"]}
    image = np.asarray(Image.open(first["new"] / "images" / "train" / "000001.png"))
    demo_image, _ = generate_image(_split_rng(0, "train", 0), image_size=64, min_shapes=1, max_shapes=3,
                                   category_ids=[1, 2, 3, 4])
    assert not np.array_equal(np.asarray(Image.open(first["plus_one"] / "images" / "train" / "000001.png")),
                              np.asarray(demo_image)), "plus_one is drawn with another seed than the demo's data"
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2
    gradient, _ = _background(np.random.default_rng(0), 16, 0.0, "gradient")
    assert (gradient[0] != gradient[-1]).any() and (gradient[:, 0] == gradient[:, -1]).all(), "a vertical blend"
    json_text = (first["plus_one"] / "annotations" / "instances_val.json").read_text()
    bench.write_dataset(tmp_path / "a", "plus_one", 8, 4)  # written once: an existing folder is kept
    assert (first["plus_one"] / "annotations" / "instances_val.json").read_text() == json_text


def write_metrics(folder: Path, evals: list[tuple[int, float, dict[str, float]]]) -> None:
    folder.mkdir(parents=True)
    rows = [{"step": 1, "loss": 3.0}]
    rows += [{"step": step, "eval_AP50": ap50, "eval_AP50_per_category": per_category, "elapsed_s": step / 3}
             for step, ap50, per_category in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def hand_made_runs(output_dir: Path, reach: dict[str, list[int | None]], known_ap50: float = 0.9) -> None:
    """plus_one runs whose AP50 is 0.5 before ``reach[mode][seed - 1]`` and 0.85 from it (never: None), evaluated
    every 64 steps to 512; the known classes (ids 1-3) score ``known_ap50`` except seed 2 of the fine-tune at step
    128 (0.7)."""
    for mode, steps in reach.items():
        for seed, first in enumerate(steps, start=1):
            evals = []
            for step in range(64, 513, 64):
                ap50 = 0.85 if first is not None and step >= first else 0.5
                known = 0.7 if (mode, seed, step) == ("finetune", 2, 128) else known_ap50
                evals.append((step, ap50, {"1": known, "2": known, "3": known, "4": 0.1}))
            write_metrics(bench.run_dir(output_dir, "plus_one", mode, seed), evals)


def summary(output_dir: Path, demo_ap50: float) -> dict:
    return bench.summarise(output_dir, {"plus_one": output_dir}, ["finetune", "scratch"], [1, 2, 3], 0.8,
                           {"plus_one": (["1", "2", "3"], demo_ap50)})["plus_one"]


def test_the_summary_medians_ratio_and_quarter_rule(tmp_path: Path) -> None:
    hand_made_runs(tmp_path / "a", {"finetune": [64, 128, None], "scratch": [448, 512, 512]})
    result = summary(tmp_path / "a", demo_ap50=0.5)
    assert [r["steps_to_target"] for r in result["modes"]["finetune"]["runs"].values()] == [64, 128, None]
    assert result["modes"]["finetune"]["median_steps_to_target"] == 128, "a run that never got there counts last"
    assert result["modes"]["scratch"]["median_steps_to_target"] == 512
    assert result["ratio_finetune_over_scratch"] == 0.25 and result["goal_quarter_of_scratch"], "a quarter is enough"

    hand_made_runs(tmp_path / "a2", {"finetune": [64, 128, None], "scratch": [256, 512, 448]})
    result = summary(tmp_path / "a2", demo_ap50=0.5)
    assert result["ratio_finetune_over_scratch"] == round(128 / 448, 3) and not result["goal_quarter_of_scratch"]

    hand_made_runs(tmp_path / "b", {"finetune": [192, 192, 256], "scratch": [512, 512, 512]})
    result = summary(tmp_path / "b", demo_ap50=0.5)
    assert result["ratio_finetune_over_scratch"] == 0.375 and not result["goal_quarter_of_scratch"]

    hand_made_runs(tmp_path / "c", {"finetune": [320, None, 448], "scratch": [None, 512, None]})
    result = summary(tmp_path / "c", demo_ap50=0.5)
    assert result["modes"]["scratch"]["median_steps_to_target"] is None
    assert result["ratio_finetune_over_scratch"] is None and result["goal_quarter_of_scratch"], \
        "scratch never reaching the target while the fine-tune does meets the goal"

    hand_made_runs(tmp_path / "d", {"finetune": [None, None, 64], "scratch": [None, None, None]})
    assert not summary(tmp_path / "d", demo_ap50=0.5)["goal_quarter_of_scratch"], "neither gets there"


def test_the_known_classes_never_fall_below_the_demo_models_own_ap50(tmp_path: Path) -> None:
    hand_made_runs(tmp_path, {"finetune": [64, 64, 64], "scratch": [None, None, None]})
    below = summary(tmp_path, demo_ap50=0.75)["known_classes"]
    assert below["lowest_finetune_AP50"] == {"AP50": 0.7, "seed": 2, "step": 128}
    assert below["demo_AP50"] == 0.75 and not below["never_below_demo"]
    assert below["final_finetune_AP50"] == {1: 0.9, 2: 0.9, 3: 0.9} and below["finals_not_below_demo"], \
        "the fine-tuned models (last evaluations) are checked apart from the dip along the way"
    assert summary(tmp_path, demo_ap50=0.7)["known_classes"]["never_below_demo"], "equal is not below"
    assert not summary(tmp_path, demo_ap50=0.95)["known_classes"]["finals_not_below_demo"]
    run = bench.summarise_run(bench.run_dir(tmp_path, "plus_one", "finetune", 2), 0.8, ["1", "2", "3"])
    assert [e["known_AP50"] for e in run["evals"]][:3] == [0.9, 0.7, 0.9], "the mean of the known classes' AP50"
    assert bench.known_ap50({"1": 0.5, "2": 1.0, "4": 0.0}, ["1", "2", "3"]) == 0.75, "a class without ground truth"


def test_a_finished_run_is_not_rerun_and_an_unfinished_one_starts_over(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "plus_one_finetune_seed1"
    folder.mkdir(parents=True)
    (folder / "all_results.json").write_text("{}")
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert bench.train(failing, folder) is False, "a folder with all_results.json is finished"
    with pytest.raises(subprocess.CalledProcessError):
        bench.train(failing, tmp_path / "runs" / "fresh")
    record = tmp_path / "argv.txt"
    writer = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))", str(record)]
    (folder / "all_results.json").unlink()
    assert bench.train(writer, folder) is True
    assert record.read_text() == "--overwrite_output_dir", "an unfinished folder's run starts over"


def test_both_modes_get_the_same_explicit_recipe(tmp_path: Path) -> None:
    args = bench.parse_args(["--output_dir", "x", "--demo_model", "demo", "--eval_every", "64"])
    recipe = bench.recipe_options(args)
    for option, value in [("--model_config", "demo"), ("--per_device_train_batch_size", "8"),
                          ("--learning_rate", "0.0004"), ("--warmup_steps", "100"), ("--max_steps", "1536"),
                          ("--eval_every_epochs", "2"), ("--image_size", "64"), ("--fliplr", "0.5"),
                          ("--flipud", "0.5"), ("--channel_shuffle", "1.0")]:
        assert recipe[recipe.index(option) + 1] == value, option
    assert "--no_augmentation" in recipe and "--contiguous_labels" in recipe
    commands = {mode: bench.run_command(Path("run"), Path("data"), mode, 1, "1", "demo", recipe, [])
                for mode in bench.MODES}


    def without(command: list[str], option: str) -> list[str]:
        i = command.index(option)
        return command[:i] + command[i + 2:]

    assert without(commands["finetune"], "--model_name_or_path") == without(commands["scratch"], "--backbone_weights")
    assert commands["finetune"][commands["finetune"].index("--model_name_or_path") + 1] == "demo"
    with pytest.raises(ValueError, match="not a whole number of epochs"):
        bench.recipe_options(bench.parse_args(["--output_dir", "x", "--demo_model", "d", "--eval_every", "48"]))


def test_a_smoke_run_end_to_end(tmp_path: Path) -> None:
    """A demo-like model folder (the demo preset's architecture and labels, random weights, saved as train.py saves
    it), then the benchmark's plus_one runs with 2 steps each: the runs, the demo model's own known-class AP50 and
    the summary files exist; a rerun trains nothing."""
    demo = tmp_path / "demo"
    torch.manual_seed(0)
    config = DetrCustomConfig(**MODEL_PRESETS["demo"], id2label={0: "N/A", 1: "circle", 2: "square", 3: "triangle"})
    processor = DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 107})
    save_folder(DetrCustomForObjectDetection(config), processor, demo)
    argv = ["--output_dir", str(tmp_path / "bench"), "--demo_model", str(demo), "--datasets", "plus_one",
            "--num_train", "16", "--num_val", "8", "--max_steps", "2", "--eval_every", "2", "--seeds", "1"]
    report = bench.main(argv)
    result = report["results"]["plus_one"]
    for mode in bench.MODES:
        assert [e["step"] for e in result["modes"][mode]["runs"][1]["evals"]] == [2], mode
    demo_own = json.loads((tmp_path / "bench" / "demo_on_plus_one_train16_val8_known.json").read_text())
    assert set(demo_own["AP50_per_category"]) == {"1", "2", "3"} == set(result["known_classes"]["category_ids"])
    assert result["known_classes"]["demo_AP50"] == round(demo_own["AP50"], 4)
    table = (tmp_path / "bench" / "finetune.md").read_text()
    assert "| step | finetune s1 | scratch s1 |" in table and report["environment"]["cpu_kind"] in table
    logs = sorted((tmp_path / "bench" / "runs").glob("*.log"))
    stamps = [log.stat().st_mtime_ns for log in logs]
    bench.main(argv)
    assert [log.stat().st_mtime_ns for log in logs] == stamps, "finished runs are not run again"
