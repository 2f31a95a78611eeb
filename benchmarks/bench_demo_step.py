"""Where a demo training step's time goes, and what variants of it cost (issue 21 item 1: the demo on every CPU).

Builds the README's demo run exactly as `scripts/train.py` does (`training.job.setup`: the demo preset, its data,
model, optimizer and loader), then times `training.loop.train_step` on the same 32 loaded batches, so the figures
are the step alone (no data loading); `--loader` times the training loader alone.

    python benchmarks/bench_demo_step.py                                # the step: ms/step, loader ms/batch
    python benchmarks/bench_demo_step.py --profile                      # + torch.profiler's table of 30 steps
    python benchmarks/bench_demo_step.py --variant "--config_overrides num_query_groups=2" --variant attn=eager
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 python benchmarks/bench_demo_step.py   # AVX2 kernels

Each `--variant` is extra `scripts/train.py` options (or `attn=eager`: the explicit-softmax attention instead of
SDPA); variants and the preset ("base") run alternately, repeat by repeat, in one process, and the ratio variant /
base of the median step time is printed. The output folders go under `--work_dir` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, environment, time_alternating  # noqa: E402

from modeling_detr_custom.training import parse_train_args  # noqa: E402
from modeling_detr_custom.training.arguments import resolve_options  # noqa: E402
from modeling_detr_custom.training.job import Job, setup  # noqa: E402
from modeling_detr_custom.training.loop import train_step  # noqa: E402

EAGER_ATTENTION = "attn=eager"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="extra train.py options (quoted), or attn=eager")
    p.add_argument("--batches", type=int, default=32, help="loaded batches each timed repeat steps through")
    p.add_argument("--repeats", type=int, default=6, help="timed repeats, after one untimed pass")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's op table of 30 base steps")
    p.add_argument("--loader", action="store_true", help="also time the training loader alone (ms per batch)")
    p.add_argument("--work_dir", type=Path, default=None, help="where the runs' output folders go")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_job(options: list[str], output_dir: Path) -> Job:
    """The demo run `scripts/train.py --output_dir output_dir *options` would train (`attn=eager` applied after)."""
    eager = EAGER_ATTENTION in options
    options = [o for o in options if o != EAGER_ATTENTION]
    job = setup(resolve_options(parse_train_args(["--output_dir", str(output_dir), *options])))
    if eager:
        job.model.config._attn_implementation = "eager"  # every attention module reads this config
    job.running.reset()
    return job


def time_steps(jobs: dict[str, tuple[Job, list]], repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each job over its own batches, jobs alternating within every repeat
    (`common.time_alternating`, after one untimed pass)."""
    def steps(job: Job, batches: list) -> None:
        for batch in batches:
            train_step(job, batch)

    fns = {name: (lambda job=job, batches=batches: steps(job, batches)) for name, (job, batches) in jobs.items()}
    passes = time_alternating(fns, warmup=1, repeats=repeats)
    return {name: [s / len(jobs[name][1]) for s in seconds] for name, seconds in passes.items()}


def loader_ms_per_batch(job: Job, batches: int = 100) -> float:
    """Milliseconds per batch of the training loader alone (decode, targets, processor, collate)."""
    iterator = iter(job.train_loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / batches * 1000


def profile_table(job: Job, batches: list, steps: int = 30) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            train_step(job, batches[i % len(batches)])
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_demo_step_"))
    variants = {"base": [], **{v: shlex.split(v) for v in args.variant}}
    jobs = {}
    for i, (name, options) in enumerate(variants.items()):
        job = make_job(options, work / f"run{i}")
        jobs[name] = (job, [b for _, b in zip(range(args.batches), job.train_loader)])
    seconds = time_steps(jobs, args.repeats)
    base = statistics.median(seconds["base"])
    result: dict[str, Any] = {"environment": {**environment("cpu"), "command": shlex.join(sys.argv)},
                              "cpu_kind": cpu_kind(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "threads": torch.get_num_threads(), "steps": {}}
    for name, s in seconds.items():
        median = statistics.median(s)
        result["steps"][name] = {"ms_per_step": median * 1000, "ratio_to_base": median / base, "seconds": s}
        print(f"{name}: {median * 1000:.1f} ms/step, ratio to base {median / base:.3f}")
    if args.loader:
        result["loader_ms_per_batch"] = loader_ms_per_batch(jobs["base"][0])
        print(f"training loader alone: {result['loader_ms_per_batch']:.1f} ms/batch")
    if args.profile:
        print(profile_table(*jobs["base"]))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
