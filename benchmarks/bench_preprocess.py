"""Benchmark: DETR preprocessing of a padded batch, ours vs transformers' DetrImageProcessor (both backends).

8 photo-like RGB PIL images of mixed sizes (640x480 to 1333x800), default DETR settings (short side 800, long side
at most 1333, ImageNet normalisation, padding to the batch maximum), one process, the three processors run in
alternation (round-robin) so that drifts in machine load hit all of them alike. Reports the median and the spread
(min-max) of the wall time per batch, and the ratio of each processor's median to ours.

    python benchmarks/bench_preprocess.py [--quick] [--repeats N] [--threads N] [--device cpu|cuda] [--output FILE]

On a machine shared with other jobs, wall times swing; the ratios of the round-robin medians and the CPU times
(at --threads 1) are the robust numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor  # noqa: E402

# (width, height): landscape and portrait, from VGA to the DETR maximum
SIZES = [(640, 480), (1333, 800), (800, 600), (480, 640), (1024, 768), (1280, 720), (800, 1333), (960, 640)]


def photo_like(width: int, height: int, seed: int) -> PIL.Image.Image:
    """Smooth colour gradients, a few solid shapes and mild noise: compresses and resizes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            128 + 100 * np.sin(x / width * 3 + seed),
            128 + 100 * np.cos(y / height * 2 + seed),
            128 + 80 * np.sin((x + y) / (width + height) * 5),
        ],
        axis=-1,
    )
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        image[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_processors(device: str) -> dict[str, Callable[[list], Any]]:
    """name -> function(images) producing a padded batch of pixel_values / pixel_mask."""
    ours = DetrCustomImageProcessor()
    torchvision_backend = transformers.DetrImageProcessor()
    pil_backend = transformers.DetrImageProcessorPil()
    return {
        "ours": lambda images: ours(images, return_tensors="pt", device=device),
        "transformers_torchvision": lambda images: torchvision_backend(images, return_tensors="pt", device=device),
        "transformers_pil": lambda images: pil_backend(images, return_tensors="pt"),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(
    processors: dict[str, Callable], images: list, warmup: int, repeats: int, device: str
) -> tuple[dict[str, list], dict[str, list]]:
    """Round-robin timing: every repeat runs each processor once, in turn. Returns wall and CPU seconds.

    CPU time (this process, all threads) is less sensitive than wall time to other processes competing for the
    cores; with more than one torch thread it includes the threads' spin-waiting, so compare it at --threads 1.
    """
    wall: dict[str, list[float]] = {name: [] for name in processors}
    cpu: dict[str, list[float]] = {name: [] for name in processors}
    for _ in range(warmup):
        for fn in processors.values():
            fn(images)
    for _ in range(repeats):
        for name, fn in processors.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = fn(images)
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            del out
    return wall, cpu


def summarise(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    base, base_cpu = statistics.median(wall["ours"]), statistics.median(cpu["ours"])
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "ratio_to_ours": statistics.median(t) / base,
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_ratio_to_ours": statistics.median(cpu[name]) / base_cpu,
            "repeats": len(t),
        }
        for name, t in wall.items()
    }


def print_table(summary: dict[str, dict[str, float]], num_images: int) -> None:
    print(
        f"{'processor':<26} {'median ms':>10} {'min-max ms':>14} {'img/s':>7} {'x ours':>7} "
        f"{'cpu ms':>8} {'cpu x ours':>10}"
    )
    for name, s in summary.items():
        spread = f"{s['min_s'] * 1e3:.0f}-{s['max_s'] * 1e3:.0f}"
        print(
            f"{name:<26} {s['median_s'] * 1e3:>10.1f} {spread:>14} {num_images / s['median_s']:>7.1f} "
            f"{s['ratio_to_ours']:>7.2f} {s['cpu_median_s'] * 1e3:>8.1f} {s['cpu_ratio_to_ours']:>10.2f}"
        )


def check_same_output(processors: dict[str, Callable], images: list) -> dict[str, float]:
    """Sanity check: identical shapes/masks and the max |difference| of pixel_values vs ours."""
    ref = processors["ours"](images)
    diffs = {}
    for name, fn in processors.items():
        out = fn(images)
        assert out["pixel_values"].shape == ref["pixel_values"].shape, name
        assert torch.equal(out["pixel_mask"].cpu(), ref["pixel_mask"].cpu()), name
        diffs[name] = float((out["pixel_values"].cpu() - ref["pixel_values"].cpu()).abs().max())
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 5 repeats (< 1 min on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per processor (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="device for ours and the torchvision backend")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    images = [photo_like(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    processors = make_processors(args.device)
    max_abs_diff = check_same_output(processors, images)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    wall, cpu = run(processors, images, warmup, repeats, args.device)
    summary = summarise(wall, cpu)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    print(f"{len(images)} images {SIZES}, padded batch {tuple(processors['ours'](images)['pixel_values'].shape)}")
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, CPU cores {os.cpu_count()}, "
        f"warm-up {warmup}, repeats {repeats}, 1-min load average {load_before} -> {load_after}"
    )
    print_table(summary, len(images))
    print("max |pixel_values - ours|: " + ", ".join(f"{k} {v:.2e}" for k, v in max_abs_diff.items()))
    if args.output:
        result = {
            "benchmark": "DETR preprocessing, padded batch",
            "image_sizes_wh": SIZES,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_before_after": [load_before, load_after],
            "warmup": warmup,
            "repeats": repeats,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "pillow": PIL.__version__,
            },
            # PyTorch's opt-in 2 MB pages for big CPU tensors: writing the fresh output batch is page-fault bound
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "results": summary,
            "max_abs_diff_vs_ours": max_abs_diff,
            "wall_times_s": wall,
            "cpu_times_s": cpu,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
