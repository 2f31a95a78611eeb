"""The README's main job, timed as a new user runs it: one seed at a time, each with a fresh data cache (issue 21
item 1: the demo within 10 minutes on every CPU kind, AP50 >= 0.85 over 3 seeds).

For each seed, `accelerate launch scripts/train.py --output_dir <output_dir>/seed<N> --seed <N> [train options]`
runs alone with `DETR_CUSTOM_CACHE` set to a new folder (so the synthetic data is drawn and written again, as on a
fresh machine); the whole command is timed from the outside. Seed 42 is the README command itself (train.py's
default seed). Recorded per seed: the whole command's minutes, the training minutes (`train_runtime_s`), AP50 and
AP (`all_results.json`), the torch threads the run used (its log: `--num_threads auto` takes the cores idle at
start-up, so a busy machine gets fewer) and the load average before it started. The summary gives min / median /
max of AP50 and of the minutes, with the CPU (kind, model name, family/model) and the date, and one markdown row
for BENCHMARKS.md's "Demo time on both CPU kinds" table.

    python benchmarks/bench_demo_time.py --output_dir outputs/bench_demo_time            # 3 seeds: 42, 1, 2
    python benchmarks/bench_demo_time.py --output_dir /tmp/demo_quick --seeds 42 -- --max_steps 50   # smoke run

Nothing else should run meanwhile: the minutes are the point. An existing seed folder is refused (train.py's own
rule), so a rerun never overwrites an earlier measurement: pass another `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_fields, cpu_kind, environment, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREADS_LINE = re.compile(r"torch CPU threads per process: (\d+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, required=True, help="one seed<N> run folder each, and the summary")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("train_options", nargs="*", help="after --: extra scripts/train.py options (default: none)")
    return p.parse_args(argv)


def accelerate_command() -> str:
    """This Python's own `accelerate` (a venv's, whether or not it is activated), else the one on PATH."""
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.exists() else "accelerate"


def run_seed(seed: int, output_dir: Path, train_options: list[str]) -> dict[str, Any]:
    """One README run of ``seed`` alone, fresh data cache; its minutes, AP50 / AP, threads and load before it."""
    run_dir, cache = output_dir / f"seed{seed}", output_dir / f".cache_seed{seed}"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: an earlier measurement; pass another --output_dir")
    shutil.rmtree(cache, ignore_errors=True)  # ours alone: a half-written cache of an interrupted run
    command = [accelerate_command(), "launch", str(REPO / "scripts" / "train.py"), "--output_dir", str(run_dir),
               "--seed", str(seed), *train_options]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(output_dir / f"seed{seed}.log", "w") as log:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False,
                                 env={**os.environ, "DETR_CUSTOM_CACHE": str(cache)})
    minutes = (time.perf_counter() - start) / 60
    if process.returncode != 0:
        raise SystemExit(f"seed {seed}: train.py exited with {process.returncode}; see {log.name}")
    shutil.rmtree(cache, ignore_errors=True)
    results = json.loads((run_dir / "all_results.json").read_text())
    threads = THREADS_LINE.findall((output_dir / f"seed{seed}.log").read_text())
    return {"seed": seed, "command_min": minutes, "train_min": results["train_runtime_s"] / 60,
            "AP50": results["AP50"], "AP": results["AP"], "threads": int(threads[0]) if threads else None,
            "load_average_before": load_before}


def spread(values: list[float], digits: int) -> str:
    """"min / median / max" of ``values``."""
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def summary_row(runs: list[dict[str, Any]], cpu: str, date: str) -> str:
    """BENCHMARKS.md's row: per-seed AP50, AP50 min / median / max, AP, whole command and training minutes."""
    def per_seed(key: str, digits: int, unit: str = "") -> str:
        return " / ".join(f"{r[key]:.{digits}f}" for r in runs) + unit

    ap50 = [r["AP50"] for r in runs]
    return (f"| {cpu} ({date}) | {per_seed('AP50', 3)} | {spread(ap50, 3)} | {per_seed('AP', 3)} | "
            f"{per_seed('command_min', 2, ' min')} | {per_seed('train_min', 2, ' min')} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.output_dir = args.output_dir.resolve()  # the runs start in the repository root
    args.output_dir.mkdir(parents=True, exist_ok=True)
    fields = cpu_fields()
    cpu = (f"{cpu_kind()}, {fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family')} model "
           f"{fields.get('model')})")
    result: dict[str, Any] = {"environment": environment("cpu"), "cpu": cpu, "train_options": args.train_options,
                              "runs": []}
    for seed in args.seeds:
        result["runs"].append(run_seed(seed, args.output_dir, args.train_options))
        print(json.dumps(result["runs"][-1]), flush=True)
        write_json(result, args.output_dir / "demo_time.json")  # what is measured survives an interruption
    runs = result["runs"]
    result["summary"] = {"AP50_min_median_max": spread([r["AP50"] for r in runs], 3),
                         "command_min_min_median_max": spread([r["command_min"] for r in runs], 2),
                         "row": summary_row(runs, cpu, result["environment"]["date"])}
    write_json(result, args.output_dir / "demo_time.json")
    print(result["summary"]["row"])
    return result


if __name__ == "__main__":
    main()
