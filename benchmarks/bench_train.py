"""Benchmark: the training data pipeline per worker, and training step time of the demo and R50 configs.

Data pipeline (one process, one thread = one dataloader worker): photo-like JPEGs at COCO sizes
(640x480 and similar) through what a training batch costs: decode -> DETR augmentation (flip,
multi-scale 480..800 / crop branch) -> processor (normalise, pad, boxes to normalised cxcywh), and
the evaluation path (decode -> processor resize to 800). Reported as images/s.

Training steps: forward + set loss (Hungarian matching) + backward + clipping + fused AdamW on
random padded batches, for the `demo` preset (64 px, batch 8), the `tiny` test config and
DETR-R50 (800 px, batch 2, the original recipe). Reported as s/step and images/s, median of the
timed steps after warm-up.

    python benchmarks/bench_train.py [--quick] [--threads 2] [--device cpu|cuda] [--output results.json]

On a GPU (`--device cuda`) the R50 step also runs under bf16 autocast, as `--mixed_precision bf16` does.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection  # noqa: E402
from modeling_detr_custom.data import DetrCollator, make_train_transforms  # noqa: E402
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor  # noqa: E402
from modeling_detr_custom.training import MODEL_PRESETS, make_optimizer  # noqa: E402

COCO_SIZES = [(640, 480), (640, 427), (480, 640), (640, 426), (500, 375), (640, 512), (427, 640), (612, 612)]


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """Smooth gradients, solid blocks and noise, JPEG quality 90: decodes and resizes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(x / width * 3 + seed), 128 + 100 * np.cos(y / height * 2 + seed),
                      128 + 80 * np.sin((x + y) / (width + height) * 5)], axis=-1)
    for _ in range(5):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        image[y0:y0 + height // 4, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    image += rng.normal(0, 4, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def coco_rows(count: int) -> list[dict]:
    """Dataset rows (schema of modeling_detr_custom.data, image undecoded) with 7 boxes each (COCO's mean)."""
    rows = []
    for i in range(count):
        width, height = COCO_SIZES[i % len(COCO_SIZES)]
        rng = np.random.default_rng(i)
        wh = rng.uniform(0.05, 0.5, (7, 2)) * [width, height]
        xy = rng.uniform(0, 1, (7, 2)) * ([width, height] - wh)
        rows.append({"image_id": i, "image": {"bytes": photo_jpeg(width, height, i), "path": None}, "width": width,
                     "height": height, "objects": {"bbox": np.concatenate([xy, wh], 1).tolist(),
                                                   "category": rng.integers(1, 91, 7).tolist(), "iscrowd": [0] * 7}})
    return rows


def images_per_second(fn: Callable[[list[dict]], Any], rows: list[dict], batch: int, repeats: int) -> dict[str, float]:
    """Median (and min-max) images/s of `fn` over batches of `rows`, after one warm-up batch."""
    fn(rows[:batch])
    rates = []
    for r in range(repeats):
        chunk = [rows[(r * batch + k) % len(rows)] for k in range(batch)]
        start = time.perf_counter()
        fn(chunk)
        rates.append(batch / (time.perf_counter() - start))
    return {"images_per_s": round(statistics.median(rates), 2), "min": round(min(rates), 2),
            "max": round(max(rates), 2)}


def bench_data(quick: bool) -> dict[str, Any]:
    """Per-worker throughput of the training and evaluation data paths at COCO sizes."""
    rows = coco_rows(16 if quick else 32)
    processor = DetrCustomImageProcessor()  # short side 800, long side <= 1333
    train = DetrCollator(processor, make_train_transforms(), seed=0)
    evaluation = DetrCollator(processor)
    decode_only = DetrCollator(processor)
    repeats = 4 if quick else 12
    return {
        "decode": images_per_second(lambda rs: [decode_only.decode(r) for r in rs], rows, 2, repeats),
        "decode_augment": images_per_second(lambda rs: [train.prepare(r) for r in rs], rows, 2, repeats),
        "train_pipeline": images_per_second(train, rows, 2, repeats),
        "eval_pipeline": images_per_second(evaluation, rows, 2, repeats),
        "note": "one process, one thread (= one dataloader worker); batch 2; JPEGs of COCO sizes, 7 boxes each",
    }


def random_batch(batch: int, size: int, num_labels: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Padded batch: pixel_values (B, 3, H, W), pixel_mask (B, H, W), labels with 7 cxcywh boxes each."""
    g = torch.Generator().manual_seed(seed)
    heights = [size - 32 * (i % 2) for i in range(batch)]
    width = round(size * 4 / 3)
    pixel_values = torch.zeros(batch, 3, size, width)
    pixel_mask = torch.zeros(batch, size, width, dtype=torch.long)
    for i, h in enumerate(heights):
        pixel_values[i, :, :h] = torch.randn(3, h, width, generator=g)
        pixel_mask[i, :h] = 1
    labels = []
    for _ in range(batch):
        wh = torch.rand(7, 2, generator=g) * 0.4 + 0.05
        labels.append({"class_labels": torch.randint(0, num_labels, (7,), generator=g).to(device),
                       "boxes": torch.cat([wh / 2 + torch.rand(7, 2, generator=g) * (1 - wh), wh], 1).to(device)})
    return {"pixel_values": pixel_values.to(device), "pixel_mask": pixel_mask.to(device), "labels": labels}


def bench_step(name: str, config_kwargs: dict, size: int, batch: int, steps: int, device: str,
               autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Median seconds per training step (forward, loss, backward, clip 0.1, fused AdamW)."""
    torch.manual_seed(0)
    config = DetrCustomConfig(**config_kwargs, num_labels=91)
    model = DetrCustomForObjectDetection(config).to(device).train()
    args = argparse.Namespace(learning_rate=1e-4, backbone_learning_rate=1e-5, weight_decay=1e-4)
    optimizer = make_optimizer(model, args)
    data = random_batch(batch, size, 91, device)
    times = []
    for step in range(steps + 2):  # 2 warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
            loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    return {"config": name, "image_size": size, "batch": batch, "device": device,
            "precision": str(autocast).replace("torch.", "") if autocast else "fp32", "s_per_step": round(median, 4),
            "images_per_s": round(batch / median, 2), "steps_timed": len(times), "parameters_M": round(params / 1e6, 2)}


def run_steps(results: dict[str, Any], runs: list[tuple], thread_counts: list[int], device: str) -> None:
    """Time each training-step config at each thread count into ``results["train_steps"]``."""
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, kwargs, size, batch, count in runs:
            results["train_steps"].append({**bench_step(name, kwargs, size, batch, count, device), "threads": threads})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and steps, R50 at 512 px")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts for the training steps "
                        "(default: 1 and all cores; on a busy "
                        "machine more threads can be much slower)")
    p.add_argument("--models", default="tiny,demo,r50", help="comma-separated training-step configs to time")
    p.add_argument("--no_data", action="store_true", help="skip the data-pipeline measurement")
    p.add_argument("--background_load", type=int, default=0,
                   help="busy-loop processes to run meanwhile: a busy machine (another job on a core)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {} if a.no_data else {"data_pipeline_per_worker": bench_data(a.quick)}
    thread_counts = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, os.cpu_count() or 1})
    steps = 3 if a.quick else 10
    r50_size = 512 if a.quick else 800
    runs = [("tiny", MODEL_PRESETS["tiny"], 64, 2, steps * 3), ("demo", MODEL_PRESETS["demo"], 64, 8, steps * 3),
            ("r50", MODEL_PRESETS["r50"], r50_size, 2, max(2, steps // 3 if a.device == "cpu" else steps))]
    runs = [run for run in runs if run[0] in a.models.split(",")]
    results["train_steps"] = []
    # a pure-Python busy loop per process: one fully loaded core each, as another training job would be
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.background_load)]
    try:
        run_steps(results, runs, thread_counts, a.device)
    finally:
        for hog in hogs:
            hog.kill()
    results["background_load"] = a.background_load
    if a.device == "cuda":
        results["train_steps"].append(bench_step("r50", MODEL_PRESETS["r50"], 800, 2, steps, "cuda", torch.bfloat16))
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count(),
                              "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
                              "machine": platform.machine(), "quick": a.quick}
    text = json.dumps(results, indent=2)
    print(text)
    if a.output:
        Path(a.output).write_text(text)
    return results


if __name__ == "__main__":
    main()
