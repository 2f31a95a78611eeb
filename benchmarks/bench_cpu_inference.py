"""Benchmark: CPU inference near the hardware (issue 21 items 2 and 3), the successor of bench_onnx.py.

Two models, each with random weights (frozen-BN statistics and biases randomised, so nothing is trivially 0 or 1):
  r50   DETR-R50 (`DetrCustomConfig()` defaults, 91 labels) at batch 1, 800x1066
  demo  the demo preset (`training.MODEL_PRESETS["demo"]`, 3 labels) at batch 1, 64x64

Paths, timed alternately repeat by repeat (order reversed every other repeat) after a warm-up, all with the same
number of torch threads (`--threads`; onnxruntime's intra-op threads the same):
  eager_fp32   `model(pixel_values, pixel_mask)` under `torch.inference_mode()`
  onnxruntime  the graph written by `export.export_detector` (fixed shape, opset 17, verified against PyTorch within
               1e-4 before it is written), CPUExecutionProvider
  timm_body    what the backbone alone costs in plain timm on the same input: `timm.create_model("resnet50",
               features_only=True, out_indices=(-1,))` for r50, `test_resnet` at the demo's output stride 8 for demo
  eager_bf16   the eager call inside `precision.inference_autocast("bf16", "cpu")`; skipped, with the reason, on a
               CPU without native bfloat16 (AVX2) and where modeling_detr_custom/precision.py is missing

Reported per path: median, IQR and min/max of the wall time (and the median process CPU time), the ratio to
eager_fp32 of the medians; FLOPs counted once with `torch.utils.flop_counter.FlopCounterMode` (the model's eager
forward, used for onnxruntime too, and the timm body's), so achieved GFLOP/s = FLOPs / median wall time, as a
fraction of the machine's fp32 peak: measured (the best GFLOP/s of a large fp32 `torch.mm`, same threads) and
theoretical (threads x clock x FLOP/cycle, the assumption stated in the JSON). For bf16 also the drift against
fp32 on the same input and weights. The JSON names the CPU kind, date and command; stdout ends with a markdown
table for BENCHMARKS.md.

    python benchmarks/bench_cpu_inference.py --output outputs/bench_cpu_inference.json   # on an idle machine
    python benchmarks/bench_cpu_inference.py --quick --threads 1     # R50 at 320x426, few repeats: a smoke run
    python benchmarks/bench_cpu_inference.py --models demo --output results/cpu_inference.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    configure_threads,
    cpu_clock_mhz,
    cpu_fields,
    cpu_kind,
    environment,
    padded_batch,
    randomise_,
    time_wall_and_cpu,
    write_json,
)

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection  # noqa: E402
from modeling_detr_custom.export import export_detector  # noqa: E402
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor  # noqa: E402
from modeling_detr_custom.training import MODEL_PRESETS  # noqa: E402

MODELS = ("r50", "demo")
PATHS = ("eager_fp32", "onnxruntime", "timm_body", "eager_bf16")
FULL = {"r50": {"canvas": (800, 1066), "repeats": 7}, "demo": {"canvas": (64, 64), "repeats": 15, "calls": 10},
        "warmup": 2, "sgemm_sizes": (2048, 4096)}
QUICK = {"r50": {"canvas": (320, 426), "repeats": 3}, "demo": {"canvas": (64, 64), "repeats": 5, "calls": 5},
         "warmup": 1, "sgemm_sizes": (2048,)}
# issue 21 item 2: eager_fp32 latency / onnxruntime latency at most this
TARGET_EAGER_OVER_ONNXRUNTIME = {"r50": 1.3, "demo": 3.0}
IDLE_LOAD = 0.5  # a 1-min load average above this at the start: the figures are not an idle machine's


# ----------------------------------------------------------------------------- machine


def machine(threads: int) -> dict[str, Any]:
    """What the figures depend on: CPU kind and model, torch's kernel level, bf16/AMX flags, cores, clock."""
    fields = cpu_fields()
    flags = set(fields.get("flags", "").split())
    return {"cpu_kind": cpu_kind(), "cpu_model_name": fields.get("model name", "unknown"),
            "cpu_vendor": fields.get("vendor_id", "unknown"), "cpu_family": fields.get("cpu family"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": {flag: flag in flags for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile",
                                                        "amx_bf16")},
            "nproc": os.cpu_count(), "threads": threads,
            "theoretical_fp32_peak": theoretical_peak(threads, fields)}


def flop_per_cycle(fields: dict[str, str]) -> tuple[int | None, str]:
    """fp32 FLOP per cycle per core and the assumption behind it (FMA = 2 FLOP, two FMA pipes per core)."""
    flags = set(fields.get("flags", "").split())
    vendor, family = fields.get("vendor_id", ""), fields.get("cpu family", "")
    if "fma" not in flags:
        return None, "no FMA flag: no peak assumed"
    if vendor == "AuthenticAMD" and family != "26":  # Zen 5 (family 26) has full-width 512-bit pipes
        return 32, "32 fp32 FLOP/cycle: two 256-bit FMA pipes (AMD Zen 2/3/4; AVX-512 runs as 2x256 on Zen 4)"
    if "avx512f" in flags:
        return 64, ("64 fp32 FLOP/cycle: two 512-bit FMA pipes (Intel Xeon Gold/Platinum, AMD Zen 5; a CPU with one "
                    "512-bit FMA unit has half)")
    return 32, "32 fp32 FLOP/cycle: two 256-bit FMA pipes (AVX2)"


def theoretical_peak(threads: int, fields: dict[str, str]) -> dict[str, Any]:
    """threads (one core each, at most nproc) x clock x FLOP/cycle, GFLOP/s; None where a factor is unknown."""
    mhz, mhz_source = cpu_clock_mhz()
    per_cycle, assumption = flop_per_cycle(fields)
    cores = min(threads, os.cpu_count() or threads)
    gflops = cores * mhz * 1e-3 * per_cycle if mhz and per_cycle else None
    return {"gflop_per_s": gflops, "cores": cores, "clock_mhz": mhz, "clock_source": mhz_source,
            "flop_per_cycle": per_cycle, "assumption": assumption}


def measured_peak(sizes: tuple[int, ...], repeats: int = 3) -> dict[str, Any]:
    """"sgemm GFLOP/s, measured": the best of ``repeats`` fp32 ``torch.mm`` of n x n by n x n, per n, at torch's
    thread count (2 n^3 FLOP each)."""
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up: oneDNN/MKL picks its kernel and allocates buffers once
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
        per_size[str(n)] = 2 * n**3 / best / 1e9
    return {"name": "sgemm GFLOP/s, measured", "gflop_per_s": max(per_size.values()), "per_size": per_size,
            "repeats": repeats}


def best_peak(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The sgemm peak measured before and after the models, keeping the higher: another process on a core
    lowers one of them, never raises it."""
    best = max(start, end, key=lambda peak: peak["gflop_per_s"])
    return {**best, "gflop_per_s_at_start": start["gflop_per_s"], "gflop_per_s_at_end": end["gflop_per_s"]}


def peak_note(result: dict[str, Any]) -> str | None:
    """Why the theoretical peak is not one, where something measured beat it (the sgemm, or a path's achieved
    GFLOP/s): the clock read is below the one the cores ran at."""
    theory = result["machine"]["theoretical_fp32_peak"]
    achieved = {"sgemm": result["machine"]["sgemm"]["gflop_per_s"]}
    achieved.update({f"{name} {path}": p["gflop_per_s"] for name, entry in result["models"].items()
                     for path, p in entry["paths"].items() if "gflop_per_s" in p})
    what, fastest = max(achieved.items(), key=lambda item: item[1])
    if theory["gflop_per_s"] is None or fastest <= theory["gflop_per_s"]:
        return None
    return (f"{what} ({fastest:.1f} GFLOP/s) beats the theoretical peak ({theory['gflop_per_s']:.1f}): the cores ran "
            f"faster than the {theory['clock_mhz']:.0f} MHz read from {theory['clock_source']} (they boost above it, "
            "or a hypervisor reports the nominal clock), so fractions of the theoretical peak are too high")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------- models and paths


def build_model(name: str) -> DetrCustomForObjectDetection:
    """The benchmarked model in eval mode on the CPU, random weights (never downloads)."""
    config = DetrCustomConfig() if name == "r50" else DetrCustomConfig(**MODEL_PRESETS["demo"], num_labels=3)
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(config).eval()
    randomise_(model)
    return model.requires_grad_(False)  # see `count_flops`


def build_timm_body(config: DetrCustomConfig) -> torch.nn.Module:
    """Plain timm's backbone of ``config`` (random init, eval): its last feature map only, at the model's stride."""
    import timm

    stride = config.backbone_output_stride
    extra = {"output_stride": stride} if stride else {}
    torch.manual_seed(0)
    body = timm.create_model(config.backbone, pretrained=False, features_only=True, out_indices=(-1,), **extra)
    return body.eval().requires_grad_(False)  # see `count_flops`


def onnx_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session using ``threads`` intra-op threads, as torch does (0: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bf16_autocast() -> tuple[Callable[[], Any] | None, str | None]:
    """(a factory of the bf16 autocast context, None) or (None, why bf16 is skipped on this machine)."""
    try:
        from modeling_detr_custom.precision import check_inference_dtype, inference_autocast
    except ImportError as err:  # precision.py is newer than this script in some checkouts
        return None, f"modeling_detr_custom.precision not importable: {err}"
    try:
        check_inference_dtype("bf16", "cpu")
    except ValueError as err:  # an AVX2 CPU: bf16 would be emulated, slower than fp32, so not worth a figure
        return None, str(err)
    return lambda: inference_autocast("bf16", "cpu"), None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as `FlopCounterMode` counts them: matmuls, convolutions and attention (2 per
    multiply-add); elementwise work, softmax and normalisation are not counted.

    The modules called must have no parameter requiring grad: FlopCounterMode's module tracker hooks the autograd
    graph of every module input that requires grad, and fails on one (e.g. the query embedding) used under
    inference_mode, where there is no graph.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- bf16 drift


def detection_scores(logits: torch.Tensor) -> torch.Tensor:
    """Each query's score as post-processing defines it: the best real class's softmax probability."""
    return logits.float().softmax(-1)[..., :-1].max(-1).values


def bf16_drift(fp32: Any, bf16: Any, processor: DetrCustomImageProcessor, canvas: tuple[int, int]) -> dict[str, Any]:
    """bf16 against fp32 on the same input and weights: max |diff| of the scores and of the normalised cxcywh
    boxes over all queries, and, after `post_process_object_detection` (threshold 0, boxes in pixels of the
    canvas), the max box difference in pixels and how many detections changed label."""
    drift: dict[str, Any] = {
        "max_abs_score_diff": float((detection_scores(bf16.logits) - detection_scores(fp32.logits)).abs().max()),
        "max_abs_box_diff_cxcywh": float((bf16.pred_boxes.float() - fp32.pred_boxes.float()).abs().max()),
        "max_abs_logit_diff": float((bf16.logits.float() - fp32.logits.float()).abs().max())}
    want, got = (processor.post_process_object_detection(out, threshold=0, target_sizes=[canvas])[0]
                 for out in (fp32, bf16))
    drift["detections"] = [len(want["boxes"]), len(got["boxes"])]
    # threshold 0 keeps every query in query order, so the i-th detections are the same query; a score that
    # underflowed to 0 would drop one and misalign them: then no pixel figure rather than a wrong one
    same = len(want["boxes"]) == len(got["boxes"])
    drift["max_abs_box_diff_px"] = float((got["boxes"] - want["boxes"]).abs().max()) if same else None
    drift["label_changes"] = int((got["labels"] != want["labels"]).sum()) if same else None
    return drift


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, settings: dict[str, Any], threads: int, folder: Path) -> dict[str, Any]:
    """Export one model, then time every path on the same (1, 3, H, W) batch and count the FLOPs."""
    canvas, repeats = settings[name]["canvas"], settings[name]["repeats"]
    model, processor = build_model(name), DetrCustomImageProcessor()
    start = time.perf_counter()
    spec = export_detector(model, processor, folder / f"{name}.onnx", canvas=canvas)
    export_s = time.perf_counter() - start
    session = onnx_session(folder / f"{name}.onnx", threads)
    body = build_timm_body(model.config)
    pixel_values, pixel_mask = padded_batch([canvas], seed=1)
    feeds = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
    autocast, bf16_skip = bf16_autocast()

    def eager_fp32():
        with torch.inference_mode():
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def eager_bf16():
        with torch.inference_mode(), autocast():
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def onnxruntime():
        return session.run(["logits", "pred_boxes"], feeds)

    def timm_body():
        with torch.inference_mode():
            return body(pixel_values)

    fns = {"eager_fp32": eager_fp32, "onnxruntime": onnxruntime, "timm_body": timm_body}
    if autocast is not None:
        fns["eager_bf16"] = eager_bf16
    expected = eager_fp32()
    onnx_diff = {key: float(np.abs(found - getattr(expected, key).numpy()).max())
                 for key, found in zip(("logits", "pred_boxes"), onnxruntime())}
    drift = bf16_drift(expected, eager_bf16(), processor, canvas) if autocast is not None else {"skipped": bf16_skip}
    flops = {"eager_fp32": count_flops(eager_fp32), "timm_body": count_flops(timm_body)}
    flops["onnxruntime"] = flops["eager_fp32"]  # the same graph: the exporter traces the eager forward
    timings = time_wall_and_cpu(fns, settings["warmup"], repeats, calls=settings[name].get("calls", 1))
    return {"model": name, "batch_size": 1, "canvas": list(canvas), "num_queries": spec["num_queries"],
            "backbone": model.config.backbone, "export_and_verify_s": export_s, "onnx_max_abs_diff": onnx_diff,
            "flops": flops, "paths": summarise_paths(timings, flops, batch_size=1),
            "skipped": {} if autocast is not None else {"eager_bf16": bf16_skip}, "bf16_drift": drift,
            "target": target(name, timings)}


def summarise_paths(timings: dict[str, dict[str, Any]], flops: dict[str, int], batch_size: int) -> dict[str, Any]:
    """Per path: wall latency in ms (median, IQR, min/max), median CPU ms, ratio to eager_fp32 of the medians, and
    GFLOP per image and achieved GFLOP/s where the FLOPs are known."""
    eager = timings["eager_fp32"]["wall"]["median_s"]
    out = {}
    for path, t in timings.items():
        wall = t["wall"]
        entry = {"median_ms": wall["median_s"] * 1e3, "q1_ms": wall["q1_s"] * 1e3, "q3_ms": wall["q3_s"] * 1e3,
                 "iqr_ms": (wall["q3_s"] - wall["q1_s"]) * 1e3, "min_ms": wall["min_s"] * 1e3,
                 "max_ms": wall["max_s"] * 1e3, "cpu_median_ms": t["cpu"]["median_s"] * 1e3,
                 "repeats": wall["repeats"], "ratio_to_eager_fp32": wall["median_s"] / eager,
                 "wall_s": t["wall_s"], "cpu_s": t["cpu_s"]}
        if path in flops:
            entry["gflop_per_image"] = flops[path] / batch_size / 1e9
            entry["gflop_per_s"] = flops[path] / wall["median_s"] / 1e9
        out[path] = entry
    return out


def target(name: str, timings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 21 item 2: eager_fp32 / onnxruntime of the median wall times against its limit."""
    ratio = timings["eager_fp32"]["wall"]["median_s"] / timings["onnxruntime"]["wall"]["median_s"]
    limit = TARGET_EAGER_OVER_ONNXRUNTIME[name]
    return {"eager_fp32_over_onnxruntime": ratio, "limit": limit, "met": ratio <= limit}


def add_peak_fractions(result: dict[str, Any]) -> None:
    """Each path's achieved GFLOP/s as a fraction of the measured sgemm peak and of the theoretical peak."""
    measured = result["machine"]["sgemm"]["gflop_per_s"]
    theoretical = result["machine"]["theoretical_fp32_peak"]["gflop_per_s"]
    for entry in result["models"].values():
        for path in entry["paths"].values():
            if "gflop_per_s" in path:
                path["fraction_of_sgemm_peak"] = path["gflop_per_s"] / measured
                path["fraction_of_theoretical_peak"] = path["gflop_per_s"] / theoretical if theoretical else None


# ----------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md, with the CPU kind, date, command, threads and load it was measured under."""
    env, mach = result["environment"], result["machine"]
    peak, sgemm = mach["theoretical_fp32_peak"], mach["sgemm"]
    theory = (f"{peak['gflop_per_s']:.0f} GFLOP/s theoretical ({peak['cores']} core(s) x {peak['clock_mhz']:.0f} MHz "
              f"from {peak['clock_source']} x {peak['flop_per_cycle']} FLOP/cycle)") if peak["gflop_per_s"] else \
        "no theoretical peak"
    lines = [f"{env['date']}, {mach['cpu_kind']} ({mach['cpu_model_name']}, torch capability "
             f"{mach['torch_cpu_capability']}), {mach['threads']} thread(s) of {mach['nproc']}, load average "
             f"{result['load_average_start'][0]} (1 min) at the start and {result['load_average_end'][0]} at the end; "
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, timm {env['timm']}: `{env['command']}`", "",
             f"Peak: {sgemm['gflop_per_s']:.1f} {sgemm['name']} (the better of {sgemm['gflop_per_s_at_start']:.1f} "
             f"before and {sgemm['gflop_per_s_at_end']:.1f} after the models, n = "
             f"{', '.join(sgemm['per_size'])}); {theory}."
             + (f" Note: {mach['peak_note']}." if mach.get("peak_note") else ""), "",
             "| model | image | path | median ms (IQR) | / eager fp32 | GFLOP/img | GFLOP/s | of sgemm "
             "| of theoretical |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for entry in result["models"].values():
        image = f"{entry['canvas'][0]}x{entry['canvas'][1]}"
        for path in PATHS:
            lines.append(table_row(entry, image, path))
    lines.append("")
    for name, entry in result["models"].items():
        lines.append(notes(name, entry))
    return "\n".join(lines)


def table_row(entry: dict[str, Any], image: str, path: str) -> str:
    if path not in entry["paths"]:
        return f"| {entry['model']} | {image} | {path} | skipped: {entry['skipped'].get(path, '?')} | | | | | |"
    p = entry["paths"][path]
    flops = [f"{p['gflop_per_image']:.2f}", f"{p['gflop_per_s']:.1f}", f"{p['fraction_of_sgemm_peak']:.0%}",
             "" if p["fraction_of_theoretical_peak"] is None else f"{p['fraction_of_theoretical_peak']:.0%}"] \
        if "gflop_per_s" in p else ["", "", "", ""]
    return (f"| {entry['model']} | {image} | {path} | {p['median_ms']:.1f} ({p['q1_ms']:.1f}-{p['q3_ms']:.1f}) | "
            f"{p['ratio_to_eager_fp32']:.2f} | " + " | ".join(flops) + " |")


def notes(name: str, entry: dict[str, Any]) -> str:
    t, d = entry["target"], entry["bf16_drift"]
    line = (f"{name}: eager fp32 / onnxruntime {t['eager_fp32_over_onnxruntime']:.2f} (target <= {t['limit']}: "
            f"{'met' if t['met'] else 'not met'}); export + check {entry['export_and_verify_s']:.1f} s; ")
    if "skipped" in d:
        return line + f"bf16 skipped: {d['skipped']}"
    px = "n/a" if d["max_abs_box_diff_px"] is None else f"{d['max_abs_box_diff_px']:.2f}"
    return line + (f"bf16 drift: max |score diff| {d['max_abs_score_diff']:.2e}, max |box diff| "
                   f"{d['max_abs_box_diff_cxcywh']:.2e} (cxcywh), {px} px after post-processing, "
                   f"{d['label_changes']} label change(s) of {d['detections'][0]} detections")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="R50 at 320x426, few repeats, sgemm at 2048 only")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per model (overrides the defaults)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and onnxruntime")
    parser.add_argument("--sgemm_sizes", type=int, nargs="+", default=None,
                        help="n of the n x n torch.mm measuring the peak (default 2048 4096; --quick 2048)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    for option in ("repeats", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1; got {getattr(args, option)}")
    if args.sgemm_sizes and min(args.sgemm_sizes) < 1:
        parser.error(f"--sgemm_sizes must be positive; got {args.sgemm_sizes}")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings = copy.deepcopy(QUICK if args.quick else FULL)
    if args.repeats:
        for name in MODELS:
            settings[name]["repeats"] = args.repeats
    if args.sgemm_sizes:
        settings["sgemm_sizes"] = tuple(args.sgemm_sizes)
    return settings


def start_record(args: argparse.Namespace, argv: list[str] | None, threads: int) -> dict[str, Any]:
    """The JSON's header: environment, machine, load at the start (warned about on stderr when not idle)."""
    import onnxruntime

    load = load_average()
    if load[0] > IDLE_LOAD:
        print(f"warning: load average {load[0]} (1 min) at the start: not an idle machine", file=sys.stderr)
    command = ["python", "benchmarks/bench_cpu_inference.py", *(sys.argv[1:] if argv is None else argv)]
    env = {**environment("cpu"), "date": datetime.date.today().isoformat(), "onnxruntime": onnxruntime.__version__,
           "command": " ".join(command), "argv": command}
    return {"benchmark": "CPU inference: eager fp32 / bf16 vs onnxruntime vs timm body, batch 1 (issue 21)",
            "environment": env, "machine": machine(threads), "quick": args.quick, "load_average_start": load,
            "models": {}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = configure_threads(args.threads)
    settings = settings_of(args)
    result = start_record(args, argv, threads)
    sgemm_at_start = result["machine"]["sgemm"] = measured_peak(settings["sgemm_sizes"])
    result["repeats"] = {name: settings[name]["repeats"] for name in args.models}
    result["calls_per_repeat"] = {name: settings[name].get("calls", 1) for name in args.models}  # timed back to back
    result["warmup"] = settings["warmup"]
    with tempfile.TemporaryDirectory(prefix="bench_cpu_inference_") as folder:
        for name in [m for m in MODELS if m in args.models]:
            result["models"][name] = bench_model(name, settings, threads, Path(folder))
            add_peak_fractions(result)
            write_json(result, args.output)  # after every model, so a long run leaves partial results
    result["load_average_end"] = load_average()
    result["machine"]["sgemm"] = best_peak(sgemm_at_start, measured_peak(settings["sgemm_sizes"]))
    add_peak_fractions(result)
    result["machine"]["peak_note"] = peak_note(result)
    write_json(result, args.output)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
