"""Learning speed of Group DETR: steps and wall time to reach validation AP50 0.5, K groups against K = 1.

Trains the README's demo (synthetic shapes, demo preset) once per (num_query_groups, seed) with
`scripts/train.py`, evaluating every epoch, and reads each run's metrics.jsonl: the first evaluation
with AP50 >= --target gives the steps and the wall time (`elapsed_s`, from the start of the run,
evaluations included); the last gives the final AP50. Writes one JSON and prints a table with the
ratios K / K=1 of the medians over seeds.

    python benchmarks/bench_learning.py --output_dir outputs/bench_learning --groups 1 4 --seeds 1 2 3
    python benchmarks/bench_learning.py --output_dir outputs/bench_learning --summarise   # existing runs only

`--parallel 2` runs two trainings at once with one torch thread each (twice the throughput on a 2-core
machine, each run slower than alone); the wall times are then those of a busy machine.

`--backbone_from MODEL.safetensors` starts every run from the backbone of a trained detr-custom model (a model
folder's or a checkpoint's `model.safetensors`) instead of a random one: the regime DETR is trained in (the paper
starts from ImageNet weights, which this machine cannot download). Its backbone is written once, as the timm
state dict `--backbone_weights` reads, to `<output_dir>/backbone.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="one sub-folder per run, and learning.json")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4],
                   help="num_query_groups values, run in this order; ratios against the smallest")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--target", type=float, default=0.5, help="validation AP50 to reach")
    p.add_argument("--parallel", type=int, default=1, help="trainings at once (each on one thread when > 1)")
    p.add_argument("--backbone_from", help="model.safetensors of a trained detr-custom model: its backbone starts "
                   "every run (default: a random backbone, as the demo)")
    p.add_argument("--summarise", action="store_true", help="do not train: read the runs already in --output_dir")
    p.add_argument("train_args", nargs="*", help="extra scripts/train.py options, after --")
    return p.parse_args(argv)


def write_backbone(model_file: Path, output_dir: Path) -> Path:
    """The backbone of a detr-custom ``model.safetensors`` as a timm state dict file (``--backbone_weights``).

    An existing file is kept when it holds the same backbone; another one is refused (its runs started from it).
    """
    prefix = "model.backbone.body."
    body = {name[len(prefix):]: tensor for name, tensor in load_file(model_file).items() if name.startswith(prefix)}
    if not body:
        raise ValueError(f"--backbone_from {str(model_file)!r} holds no {prefix}* tensors: not a detr-custom model")
    out = output_dir / "backbone.safetensors"
    if out.is_file():
        existing = load_file(out)
        if existing.keys() != body.keys() or not all(torch.equal(existing[k], body[k]) for k in body):
            raise ValueError(f"{out} holds another backbone than {str(model_file)!r}: use another --output_dir")
        return out
    save_file(body, out)
    return out


def run_dir(output_dir: Path, groups: int, seed: int) -> Path:
    return output_dir / f"groups{groups}_seed{seed}"


def train(output_dir: Path, groups: int, seed: int, threads: str, extra: list[str]) -> None:
    """One demo training; its log goes to <run>.log. An existing run folder is kept (the runs are resumable)."""
    folder = run_dir(output_dir, groups, seed)
    if (folder / "all_results.json").is_file():
        return
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--output_dir", str(folder), "--seed", str(seed),
               "--config_overrides", f"num_query_groups={groups}", "--num_threads", threads, *extra]
    with open(f"{folder}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})


def summarise_run(folder: Path, target: float) -> dict:
    """Steps / wall time of the first eval with AP50 >= target (None if never), final AP50 and runtime."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_AP50" in r]
    reached = next((r for r in evals if r["eval_AP50"] >= target), None)
    results = json.loads((folder / "all_results.json").read_text())
    return {"steps_to_target": reached and reached["step"],
            "seconds_to_target": reached and round(reached["elapsed_s"], 1),
            "final_AP50": round(results["AP50"], 4), "final_AP": round(results["AP"], 4),
            "train_runtime_s": results["train_runtime_s"], "global_step": results["global_step"]}


def median(values: list) -> float | None:
    """Median where None (the run never reached the target) counts as later than any run: None if the median is."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2: len(ordered) // 2 + 1]
    return None if None in middle else statistics.mean(middle)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = [(groups, seed) for groups in args.groups for seed in args.seeds]
    if not args.summarise:
        extra = list(args.train_args)
        if args.backbone_from:
            extra += ["--backbone_weights", str(write_backbone(Path(args.backbone_from), output_dir))]
        threads = "1" if args.parallel > 1 else "auto"
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda run: train(output_dir, *run, threads, extra), runs))
    per_run = {f"groups{g}_seed{s}": summarise_run(run_dir(output_dir, g, s), args.target) for g, s in runs}
    table = {}
    for groups in args.groups:
        mine = [per_run[f"groups{groups}_seed{s}"] for s in args.seeds]
        table[groups] = {key: median([r[key] for r in mine]) for key in ("steps_to_target", "seconds_to_target",
                                                                         "final_AP50")}
        table[groups]["final_AP50_min_max"] = (min(r["final_AP50"] for r in mine), max(r["final_AP50"] for r in mine))
    base = table[min(args.groups)]  # ratios against the paper's DETR (K = 1) when it is among the runs
    for groups, row in table.items():
        for key in ("steps_to_target", "seconds_to_target"):
            row[f"{key}_ratio"] = round(row[key] / base[key], 3) if row[key] and base[key] else None
        print(f"K={groups}: median steps to AP50 {args.target} {row['steps_to_target']} "
              f"(x{row['steps_to_target_ratio']}), "
              f"seconds {row['seconds_to_target']} (x{row['seconds_to_target_ratio']}), final AP50 median "
              f"{row['final_AP50']} min/max {row['final_AP50_min_max']}")
    report = {"environment": environment("cpu"), "target_AP50": args.target, "parallel": args.parallel,
              "runs": per_run, "by_groups": table}
    (output_dir / "learning.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
