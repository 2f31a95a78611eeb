"""Fine-tuning the demo's model against training from scratch on small datasets it never saw (issue 24 item 4).

Writes two synthetic COCO datasets into `<output_dir>/data/` (deterministic, 64 px as the demo, 256 train / 64 val
images by default):

- `new`: other classes and another look: ring, cross, diamond on two-colour gradient backgrounds (the demo draws
  circle, square, triangle on solid ones);
- `plus_one`: the demo's three shapes plus a fourth class, bar, drawn with a seed the demo's data never uses.

Then, for each dataset, seed and mode, one `scripts/train.py` run into `<output_dir>/runs/<dataset>_<mode>_seed<N>`:

- `finetune`: `--model_name_or_path <demo model> --contiguous_labels`, as README "Fine-tune on your own data";
- `scratch`: the same recipe from a random model.

"The same recipe" is stated explicitly on both command lines: the options of `presets.finetune_recipe("demo")`
(the recipe a fine-tune of the demo's model takes: batch 8, lr 4e-4 / backbone 4e-4, warmup 100, lr x0.1 after 40
epochs, flips both ways and shuffled colour channels but not DETR's multi-scale crops, 64 px; before 2026-12-07's
flips: x0.1 after 17 and no flips or colour change, and before the 20-epoch demo preset warmup 200, x0.1 after 24),
with the same `--max_steps`, evaluation interval and seed. Evaluation every `--eval_every` steps (a whole number
of epochs) records AP50 and the AP50 of each category in metrics.jsonl.

The summary (`finetune.json`, `finetune.md`) gives per dataset and mode the AP50 of each seed at each evaluated
step, the steps to AP50 >= --target per seed and their median (a run that never reaches it counts as later than any
run, bench_learning.py's rule), the ratio finetune / scratch of the medians, and for `plus_one` the known classes'
AP50 (circle, square, triangle) of every fine-tune evaluation against the demo model's own AP50 on them (the demo
model evaluated on plus_one's val split before any fine-tuning). The goals of issue 24: the fine-tune median at most
a quarter of the scratch median (or scratch never gets there), and the known classes never below the demo's own,
checked two ways: the fine-tuned models (each seed's last evaluation) and every evaluation along the way.

    accelerate launch scripts/train.py --output_dir outputs/demo        # the demo's model, once
    python benchmarks/bench_finetune.py --demo_model outputs/demo --output_dir outputs/bench_finetune
    python benchmarks/bench_finetune.py --demo_model outputs/demo --output_dir outputs/bench_finetune --summarise
    python benchmarks/bench_finetune.py --demo_model outputs/demo --output_dir /tmp/ft_quick --quick   # smoke run

A run whose folder holds `all_results.json` is finished and not run again (rerun the command after an
interruption); an unfinished one starts over (`--overwrite_output_dir`). `--parallel 2` (default) runs two at a
time with one torch thread each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learning import median  # noqa: E402
from common import environment  # noqa: E402

from modeling_detr_custom.data.synthetic import make_synthetic_coco  # noqa: E402
from modeling_detr_custom.training.presets import finetune_recipe  # noqa: E402

# The two datasets: make_synthetic_coco kwargs besides the image counts. Seeds 2401/2402: the demo's data is seed 0.
DATASETS: dict[str, dict[str, Any]] = {
    "new": dict(shapes=("ring", "cross", "diamond"), num_classes=3, background="gradient", seed=2402),
    "plus_one": dict(num_classes=4, seed=2401),  # circle, square, triangle, bar
}
COMMON_DATA = dict(image_size=64, min_shapes=1, max_shapes=3)  # the demo's (data/synthetic.py SYNTHETIC_DEFAULTS)
MODES = ("finetune", "scratch")
QUICK = dict(num_train=16, num_val=8, max_steps=8, eval_every=4, seeds=[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="data/, runs/, finetune.json and finetune.md")
    p.add_argument("--demo_model", required=True, help="the demo's model folder (train.py --output_dir outputs/demo)")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--num_train", type=int, default=256, help="training images of each dataset")
    p.add_argument("--num_val", type=int, default=64, help="validation images of each dataset")
    p.add_argument("--max_steps", type=int, default=1536, help="optimizer steps of every run")
    p.add_argument("--eval_every", type=int, default=64,
                   help="evaluate every N steps: a multiple of the steps per epoch (num_train / batch 8)")
    p.add_argument("--target", type=float, default=0.8, help="validation AP50 to reach")
    p.add_argument("--parallel", type=int, default=2, help="trainings at once (each on one thread when > 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16 train / 8 val images, 8 steps, evaluation every 4, seed 1")
    p.add_argument("--summarise", action="store_true", help="do not train: read the runs already in --output_dir")
    p.add_argument("train_args", nargs="*", help="extra scripts/train.py options for every run, after --")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- data


def write_dataset(output_dir: Path, name: str, num_train: int, num_val: int) -> Path:
    """``<output_dir>/data/<name>_train<N>_val<M>``, written once (into a temporary folder, then renamed)."""
    folder = output_dir / "data" / f"{name}_train{num_train}_val{num_val}"
    if not (folder / "annotations" / "instances_val.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_synthetic_coco(tmp, num_train=num_train, num_val=num_val, **COMMON_DATA, **DATASETS[name])
        os.replace(tmp, folder)
    return folder


# ----------------------------------------------------------------------------- runs


def recipe_options(args: argparse.Namespace) -> list[str]:
    """The recipe of both modes, explicitly: the demo model's fine-tune recipe with this benchmark's steps."""
    recipe = finetune_recipe("demo")
    batch = recipe["per_device_train_batch_size"]
    steps_per_epoch = math.ceil(args.num_train / batch)
    if args.eval_every % steps_per_epoch:
        raise ValueError(f"--eval_every {args.eval_every} is not a whole number of epochs ({steps_per_epoch} steps "
                         f"each: {args.num_train} images, batch {batch})")
    return ["--model_config", "demo", "--image_size", str(recipe["image_size"]),
            "--per_device_train_batch_size", str(batch), "--learning_rate", str(recipe["learning_rate"]),
            "--backbone_learning_rate", str(recipe["backbone_learning_rate"]),
            "--warmup_steps", str(recipe["warmup_steps"]), "--lr_drop_epochs", str(recipe["lr_drop_epochs"]),
            "--augmentation" if recipe["augmentation"] else "--no_augmentation",
            *(option for key in ("fliplr", "flipud", "channel_shuffle") for option in (f"--{key}", str(recipe[key]))),
            "--max_steps", str(args.max_steps), "--eval_every_epochs", str(args.eval_every // steps_per_epoch),
            "--contiguous_labels", "--checkpointing_steps", "0", "--checkpointing_epochs", "0",
            "--picture_images", "0"]


def run_dir(output_dir: Path, dataset: str, mode: str, seed: int) -> Path:
    return output_dir / "runs" / f"{dataset}_{mode}_seed{seed}"


def finished(folder: Path) -> bool:
    return (folder / "all_results.json").is_file()


def run_command(folder: Path, data: Path, mode: str, seed: int, threads: str, demo_model: str,
                recipe: list[str], extra: list[str]) -> list[str]:
    start = ["--model_name_or_path", demo_model] if mode == "finetune" else ["--backbone_weights", "none"]
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--coco_dir", str(data), "--output_dir", str(folder),
            "--seed", str(seed), "--num_threads", threads, *start, *recipe, *extra]


def train(command: list[str], folder: Path) -> bool:
    """Run ``command`` (a train.py run into ``folder``) unless the folder holds a finished run; its log goes to
    ``<folder>.log``. An unfinished folder starts over. Returns whether it ran."""
    if finished(folder):
        return False
    if folder.exists():
        command = [*command, "--overwrite_output_dir"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return True


def known_classes_copy(data: Path, known: list[str]) -> Path:
    """``<data>_known``: ``data``'s val split restricted to the categories ``known`` (their annotations only; the
    same images, linked). COCO evaluates each category on its own, so a model's AP50 there is the mean of its
    per-category AP50 of those classes on the full split; and the data check accepts the demo's model on it (it
    refuses a split with a class the model does not know)."""
    folder = data.with_name(data.name + "_known")
    coco = json.loads((data / "annotations" / "instances_val.json").read_text())
    coco["categories"] = [c for c in coco["categories"] if str(c["id"]) in known]
    coco["annotations"] = [a for a in coco["annotations"] if str(a["category_id"]) in known]
    coco["images"] = [i for i in coco["images"] if any(a["image_id"] == i["id"] for a in coco["annotations"])]
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    (folder / "images").mkdir(exist_ok=True)
    if not (folder / "images" / "val").exists():
        (folder / "images" / "val").symlink_to((data / "images" / "val").resolve(), target_is_directory=True)
    return folder


def evaluate_demo(output_dir: Path, demo_model: str, data: Path, known: list[str]) -> Path:
    """The demo model's COCO AP (per category included) on ``data``'s val split restricted to the classes it knows
    (``known``, category ids), before any fine-tuning."""
    out = output_dir / f"demo_on_{data.name}_known.json"
    if not out.is_file():
        command = [sys.executable, str(REPO / "scripts" / "evaluate_model.py"), "--model", demo_model,
                   "--coco_dir", str(known_classes_copy(data, known)), "--split", "val", "--output_file", str(out)]
        with open(f"{out}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return out


# ----------------------------------------------------------------------------- summary


def category_ids(data: Path, names: list[str]) -> list[str]:
    """The category ids (strings, as AP50_per_category keys) of the classes ``names`` in ``data``'s val split."""
    categories = json.loads((data / "annotations" / "instances_val.json").read_text())["categories"]
    return [str(c["id"]) for c in categories if c["name"] in names]


def known_ap50(per_category: dict[str, float], known: list[str]) -> float | None:
    """The AP50 of the known classes: the mean of their per-category AP50 (COCO's AP50 restricted to them)."""
    values = [per_category[c] for c in known if c in per_category]
    return statistics.mean(values) if values else None


def summarise_run(folder: Path, target: float, known: list[str] | None = None) -> dict[str, Any]:
    """Each evaluation's step, AP50 (and known-class AP50) and the first step with AP50 >= target (None if never)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = []
    for row in rows:
        if "eval_AP50" not in row:
            continue
        entry = {"step": row["step"], "AP50": round(row["eval_AP50"], 4), "elapsed_s": round(row["elapsed_s"], 1)}
        if known is not None:
            value = known_ap50(row.get("eval_AP50_per_category", {}), known)
            entry["known_AP50"] = None if value is None else round(value, 4)
        evals.append(entry)
    reached = next((e for e in evals if e["AP50"] >= target), None)
    return {"evals": evals, "steps_to_target": reached and reached["step"],
            "seconds_to_target": reached and reached["elapsed_s"], "final_AP50": evals[-1]["AP50"] if evals else None}


def summarise(output_dir: Path, datasets: dict[str, Path], modes: list[str], seeds: list[int], target: float,
              demo_known: dict[str, tuple[list[str], float]]) -> dict[str, Any]:
    """Per dataset: each mode's runs and median steps to ``target``, the ratio finetune / scratch, and for the
    datasets in ``demo_known`` ({dataset: (known category ids, the demo model's AP50 on them)}) the floor check."""
    report: dict[str, Any] = {}
    for name in datasets:
        known, floor = demo_known.get(name, (None, None))
        by_mode = {}
        for mode in modes:
            runs = {seed: summarise_run(run_dir(output_dir, name, mode, seed), target, known) for seed in seeds}
            by_mode[mode] = {"runs": runs, "median_steps_to_target": median([r["steps_to_target"]
                                                                             for r in runs.values()])}
        entry: dict[str, Any] = {"modes": by_mode}
        if "finetune" in by_mode and "scratch" in by_mode:
            fine, scratch = by_mode["finetune"]["median_steps_to_target"], by_mode["scratch"]["median_steps_to_target"]
            entry["ratio_finetune_over_scratch"] = round(fine / scratch, 3) if fine and scratch else None
            entry["goal_quarter_of_scratch"] = fine is not None and (scratch is None or fine <= scratch / 4)
        if known is not None and "finetune" in by_mode:
            lowest = min(((e["known_AP50"], seed, e["step"]) for seed, r in by_mode["finetune"]["runs"].items()
                          for e in r["evals"] if e["known_AP50"] is not None), default=None)
            finals = {seed: r["evals"][-1]["known_AP50"] for seed, r in by_mode["finetune"]["runs"].items()
                      if r["evals"] and r["evals"][-1]["known_AP50"] is not None}
            entry["known_classes"] = {
                "category_ids": known, "demo_AP50": round(floor, 4),
                "final_finetune_AP50": finals,
                "finals_not_below_demo": bool(finals) and min(finals.values()) >= round(floor, 4),
                "lowest_finetune_AP50": lowest and {"AP50": lowest[0], "seed": lowest[1], "step": lowest[2]},
                "never_below_demo": lowest is not None and lowest[0] >= round(floor, 4)}
        report[name] = entry
    return report


def markdown(report: dict[str, Any], target: float, env: dict[str, Any]) -> str:
    """The tables for BENCHMARKS.md: AP50 per seed at each evaluated step, steps to target, ratios, known classes."""
    lines = [f"Fine-tune from the demo's model vs from scratch, same recipe ({env['run_at'][:10]}, "
             f"{env['cpu_kind']} CPU, torch {env['torch']}): `{env['command']}`", ""]
    for name, entry in report.items():
        modes = entry["modes"]
        steps = sorted({e["step"] for m in modes.values() for r in m["runs"].values() for e in r["evals"]})
        columns = [(mode, seed) for mode, m in modes.items() for seed in m["runs"]]
        lines += [f"**{name}**: validation AP50 by step", "",
                  "| step | " + " | ".join(f"{mode} s{seed}" for mode, seed in columns) + " |",
                  "|---:|" + "---:|" * len(columns)]
        for step in steps:
            cells = []
            for mode, seed in columns:
                e = next((e for e in modes[mode]["runs"][seed]["evals"] if e["step"] == step), None)
                cell = "" if e is None else f"{e['AP50']:.3f}"
                if e is not None and e.get("known_AP50") is not None:
                    cell += f" ({e['known_AP50']:.3f})"
                cells.append(cell)
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines += ["", f"| mode | steps to AP50 >= {target} per seed | median |", "|---|---|---:|"]
        for mode, m in modes.items():
            per_seed = ", ".join("never" if r["steps_to_target"] is None else str(r["steps_to_target"])
                                 for r in m["runs"].values())
            med = m["median_steps_to_target"]
            lines.append(f"| {mode} | {per_seed} | {'never' if med is None else med} |")
        lines.append("")
        if "ratio_finetune_over_scratch" in entry:
            lines.append(f"ratio finetune / scratch of the medians: {entry['ratio_finetune_over_scratch']}; "
                         f"fine-tune in at most a quarter of scratch's steps (or scratch never): "
                         f"{'yes' if entry['goal_quarter_of_scratch'] else 'no'}")
        if "known_classes" in entry:
            k = entry["known_classes"]
            low = k["lowest_finetune_AP50"]
            where = f"{low['AP50']:.3f} (seed {low['seed']}, step {low['step']})" if low else "none"
            finals = ", ".join(f"{v:.3f}" for v in k["final_finetune_AP50"].values())
            lines.append(f"known classes (in parentheses above): the demo model's own AP50 {k['demo_AP50']:.3f}; the "
                         f"fine-tuned models' (the last evaluation of each seed) {finals or 'none'}: none below: "
                         f"{'yes' if k['finals_not_below_demo'] else 'no'}; the lowest along the way {where}: never "
                         f"below: {'yes' if k['never_below_demo'] else 'no'}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datasets = {name: write_dataset(output_dir, name, args.num_train, args.num_val) for name in args.datasets}
    recipe = recipe_options(args)
    if not args.summarise:
        threads = "1" if args.parallel > 1 else "auto"
        folders = {(name, mode, seed): run_dir(output_dir, name, mode, seed)
                   for name in datasets for seed in args.seeds for mode in args.modes}
        jobs = [(run_command(folder, datasets[name], mode, seed, threads, str(args.demo_model), recipe,
                             list(args.train_args)), folder) for (name, mode, seed), folder in folders.items()]
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: train(*job), jobs))
    demo_labels = json.loads((Path(args.demo_model) / "config.json").read_text())["id2label"].values()
    demo_known = {}
    if "plus_one" in datasets:
        data = datasets["plus_one"]
        known = category_ids(data, [str(n) for n in demo_labels])
        demo = json.loads(evaluate_demo(output_dir, str(args.demo_model), data, known).read_text())
        demo_known["plus_one"] = (known, known_ap50(demo["AP50_per_category"], known))
    env = {**environment("cpu"), "run_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "benchmarks/bench_finetune.py", *(sys.argv[1:] if argv is None else argv)])}
    report = {"environment": env, "target_AP50": args.target, "parallel": args.parallel,
              "recipe_options": recipe, "num_train": args.num_train, "num_val": args.num_val,
              "datasets": {name: {**DATASETS[name], **COMMON_DATA, "folder": str(path)}
                           for name, path in datasets.items()},
              "results": summarise(output_dir, datasets, args.modes, args.seeds, args.target, demo_known)}
    (output_dir / "finetune.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(report["results"], args.target, env)
    (output_dir / "finetune.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
