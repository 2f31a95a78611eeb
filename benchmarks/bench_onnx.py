"""Benchmark: onnxruntime (CPU) latency of the exported graph against PyTorch eager, in one process.

Two models, each with random weights (frozen-BN statistics and biases randomised, so nothing is trivially 0 or 1):
  r50   DETR-R50 (`DetrCustomConfig()` defaults, 91 labels) at batch 1, 800x1066
  demo  the demo preset (`training.MODEL_PRESETS["demo"]`, 3 labels) at batch 1, 64x64

Each is exported with `modeling_detr_custom.export.export_detector` (fixed shape, opset 17, verified against PyTorch
within 1e-4 before it is written) into a temporary folder. Then `session.run` (CPUExecutionProvider) and the eager
forward under `torch.inference_mode()` are timed alternately, repeat by repeat (order reversed every other repeat),
after a warm-up, with the same number of threads for both. Reported: median, quartiles and min/max of the wall
time and of the process CPU time, and the ratio onnxruntime / PyTorch of the medians (< 1: onnxruntime is faster).

    python benchmarks/bench_onnx.py                        # R50 at 800x1066 and demo at 64x64
    python benchmarks/bench_onnx.py --quick                # R50 at 320x426, few repeats: a smoke run
    python benchmarks/bench_onnx.py --models demo --output results/onnx.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import configure_threads, environment, padded_batch, randomise_, time_wall_and_cpu, write_json  # noqa: E402

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection  # noqa: E402
from modeling_detr_custom.export import export_detector  # noqa: E402
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor  # noqa: E402
from modeling_detr_custom.training import MODEL_PRESETS  # noqa: E402

MODELS = ("r50", "demo")
FULL = {"r50": {"canvas": (800, 1066), "repeats": 7}, "demo": {"canvas": (64, 64), "repeats": 50}, "warmup": 2}
QUICK = {"r50": {"canvas": (320, 426), "repeats": 3}, "demo": {"canvas": (64, 64), "repeats": 10}, "warmup": 1}


def build_model(name: str) -> DetrCustomForObjectDetection:
    """The benchmarked model in eval mode on the CPU, random weights (never downloads)."""
    config = DetrCustomConfig() if name == "r50" else DetrCustomConfig(**MODEL_PRESETS["demo"], num_labels=3)
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(config).eval()
    randomise_(model)
    return model


def onnx_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session using ``threads`` intra-op threads, as torch does (0: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_alternating(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, Any]:
    """`common.time_wall_and_cpu` of "onnxruntime" and "pytorch", with the ratios onnxruntime / pytorch."""
    result: dict[str, Any] = time_wall_and_cpu(fns, warmup, repeats)
    result["ratio_onnxruntime_over_pytorch"] = {
        kind: result["onnxruntime"][kind]["median_s"] / result["pytorch"][kind]["median_s"] for kind in ("wall", "cpu")}
    return result


def bench_model(name: str, settings: dict[str, Any], threads: int, folder: Path) -> dict[str, Any]:
    """Export one model, then time onnxruntime and PyTorch on the same (1, 3, H, W) batch."""
    canvas, repeats = settings[name]["canvas"], settings[name]["repeats"]
    model = build_model(name)
    start = time.perf_counter()
    spec = export_detector(model, DetrCustomImageProcessor(), folder / f"{name}.onnx", canvas=canvas)
    export_s = time.perf_counter() - start
    session = onnx_session(folder / f"{name}.onnx", threads)
    pixel_values, pixel_mask = padded_batch([canvas], seed=1)
    feeds = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}

    def run_pytorch():
        with torch.inference_mode():
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def run_onnxruntime():
        return session.run(["logits", "pred_boxes"], feeds)

    expected, found = run_pytorch(), run_onnxruntime()
    diff = {key: float(np.abs(f - getattr(expected, key).numpy()).max())
            for key, f in zip(("logits", "pred_boxes"), found)}
    result = time_alternating({"onnxruntime": run_onnxruntime, "pytorch": run_pytorch}, settings["warmup"], repeats)
    result.update(model=name, batch_size=1, canvas=list(canvas), num_queries=spec["num_queries"],
                  export_and_verify_s=export_s, max_abs_diff=diff)
    report(f"{name}, batch 1, {canvas[0]}x{canvas[1]}, fp32, {threads} thread(s)", result)
    return result


def report(title: str, result: dict[str, Any]) -> None:
    print(f"\n== {title} (export + verification {result['export_and_verify_s']:.1f} s, max |diff| "
          f"logits {result['max_abs_diff']['logits']:.1e}, pred_boxes {result['max_abs_diff']['pred_boxes']:.1e})")
    for name in ("onnxruntime", "pytorch"):
        s = result[name]["wall"]
        print(f"  {name:<12} median {s['median_s'] * 1e3:9.1f} ms  IQR {s['q1_s'] * 1e3:.1f}-{s['q3_s'] * 1e3:.1f}"
              f"  min-max {s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}  (n={s['repeats']})")
    ratio = result["ratio_onnxruntime_over_pytorch"]
    print(f"  ratio onnxruntime / pytorch: wall {ratio['wall']:.3f}, cpu {ratio['cpu']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="R50 at 320x426, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per model (overrides the defaults)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import onnxruntime

    args = parse_args(argv)
    threads = configure_threads(args.threads)
    settings = copy.deepcopy(QUICK if args.quick else FULL)
    if args.repeats:
        for name in MODELS:
            settings[name]["repeats"] = args.repeats
    result: dict[str, Any] = {"benchmark": "onnxruntime CPU vs PyTorch eager, same weights, batch 1",
                              "environment": {**environment("cpu"), "onnxruntime": onnxruntime.__version__,
                                              "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]},
                              "quick": args.quick, "models": {}}
    print(result["environment"])
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as folder:
        for name in [m for m in MODELS if m in args.models]:
            result["models"][name] = bench_model(name, settings, threads, Path(folder))
            write_json(result, args.output)  # after every model, so a long run leaves partial results
    result["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
