"""Shared helpers for the model benchmarks: identical-weight model pairs, inputs, alternating timing, JSON.

Every benchmark runs ours and transformers' DETR in ONE process, alternating within each repeat (and swapping the
order every repeat, so neither always runs first on a warm cache); it reports the median and the spread (quartiles
and min/max) of each and the ratio ours / transformers of the medians.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

# ----------------------------------------------------------------------------- environment


def configure_threads(threads: int | None) -> int:
    """Set intra-op threads (None leaves torch's default) and return the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return None


def cpu_kind() -> str:
    """"AVX-512" when /proc/cpuinfo lists avx512f, else "AVX2" (the two kinds of machine BENCHMARKS.md names)."""
    text = _cpuinfo()
    if text is None:
        return "unknown"
    return "AVX-512" if "avx512f" in text.split() else "AVX2"


def cpu_fields() -> dict[str, str]:
    """The first processor's "key: value" lines of /proc/cpuinfo (model name, vendor_id, cpu family, flags, ...);
    {} where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in (_cpuinfo() or "").split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_clock_mhz() -> tuple[float | None, str]:
    """(MHz, where it came from) for a theoretical peak: lscpu's "CPU max MHz" (the boost clock) where it says one,
    else the highest "cpu MHz" of /proc/cpuinfo (the current clock; under a hypervisor often the nominal one)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("CPU max MHz:"):
            return float(line.split(":")[1].replace(",", ".")), "lscpu \"CPU max MHz\""
    current = [float(line.split(":")[1]) for line in (_cpuinfo() or "").splitlines() if line.startswith("cpu MHz")]
    return (max(current), "/proc/cpuinfo \"cpu MHz\"") if current else \
        (None, "no clock in lscpu or /proc/cpuinfo")


def environment(device: str) -> dict[str, Any]:
    import timm
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),  # the day of the run, as BENCHMARKS.md records it
        "run_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_kind": cpu_kind(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory. (getrusage's
    ru_maxrss survives fork + exec, so a child started by a big parent would report the parent's peak.)
    Elsewhere: resource.getrusage (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def write_json(result: dict, path: str | os.PathLike | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- timing


def time_alternating(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function; every repeat runs each once, the order reversed on odd repeats."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def time_wall_and_cpu(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                      device: str = "cpu", calls: int = 1) -> dict[str, dict[str, Any]]:
    """Wall and process-CPU seconds per call of each function, summarised and raw; every repeat runs each once,
    the order reversed on odd repeats.

    ``calls`` > 1: a repeat times ``calls`` back-to-back calls of a function, after one untimed call, and records
    their mean: what a model serving image after image costs. A few-millisecond model timed one call at a time
    right after another model or runtime runs with caches and thread pools left in the other's state (the demo
    model: 17 ms per call alternating with timm's body, 5-9 ms back to back, 2026-12-07)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            if calls > 1:
                fns[name]()
            synchronize(device)
            start_cpu, start = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fns[name]()
            synchronize(device)
            wall[name].append((time.perf_counter() - start) / calls)
            cpu[name].append((time.process_time() - start_cpu) / calls)
    return {name: {"wall": summarise(wall[name]), "cpu": summarise(cpu[name]), "wall_s": wall[name], "cpu_s": cpu[name]}
            for name in names}


def summarise(samples: list[float]) -> dict[str, float]:
    """Median, quartiles (IQR), min, max of seconds."""
    q1, _, q3 = np.percentile(samples, [25, 50, 75])
    return {"median_s": statistics.median(samples), "q1_s": float(q1), "q3_s": float(q3),
            "min_s": min(samples), "max_s": max(samples), "repeats": len(samples)}


def compare(times: dict[str, list[float]], ours: str = "ours", theirs: str = "transformers") -> dict[str, Any]:
    """Summary of each implementation and the ratio ours / theirs of the medians (< 1: ours is faster)."""
    out = {name: summarise(t) for name, t in times.items()}
    out["ratio_ours_over_transformers"] = out[ours]["median_s"] / out[theirs]["median_s"]
    return out


def print_comparison(title: str, result: dict[str, Any], unit_count: int | None = None, unit: str = "img") -> None:
    print(f"\n== {title}")
    for name, s in result.items():
        if not isinstance(s, dict) or "median_s" not in s:
            continue
        rate = f"  {unit_count / s['median_s']:7.2f} {unit}/s" if unit_count else ""
        print(f"  {name:<14} median {s['median_s'] * 1e3:9.1f} ms  IQR {s['q1_s'] * 1e3:.1f}-{s['q3_s'] * 1e3:.1f}"
              f"  min-max {s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}  (n={s['repeats']}){rate}")
    print(f"  ratio ours / transformers: {result['ratio_ours_over_transformers']:.3f}")


# ----------------------------------------------------------------------------- models


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random frozen-BN statistics/affine and biases (as in tests/test_parity.py), so nothing is trivially 0/1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var") or (name.endswith("weight") and tensor.ndim == 1 and "backbone" in name):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)


def build_pair(backbone: str = "resnet50", num_labels: int = 91, auxiliary_loss: bool = False,
               seed: int = 0, ours_overrides: dict | None = None, **detr_kwargs):
    """(ours, transformers) DETR holding identical weights, both on the CPU in eval mode.

    transformers' `DetrForObjectDetection(DetrConfig(use_timm_backbone=True, ...))` gets random weights with
    randomised frozen-BN statistics; ours is built from it by `conversion.build_and_verify`, which refuses to
    return unless both agree within 1e-4 on a random padded batch. `detr_kwargs` go to transformers' DetrConfig
    (e.g. dropouts); the same dropouts are given to ours. `auxiliary_loss` is transformers' flag (ours always
    keeps the original's default, heads on every decoder layer).
    """
    from transformers import DetrConfig, DetrForObjectDetection

    from modeling_detr_custom.conversion import build_and_verify, config_from_hf

    config = DetrConfig(use_timm_backbone=True, backbone=backbone, use_pretrained_backbone=False,
                        auxiliary_loss=auxiliary_loss, num_labels=num_labels, **detr_kwargs)
    torch.manual_seed(seed)
    theirs = DetrForObjectDetection(config)
    randomise_(theirs, seed)
    our_config = config_from_hf(theirs.config.to_dict())
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        if key in detr_kwargs:
            setattr(our_config, key, detr_kwargs[key])
    for key, value in (ours_overrides or {}).items():
        setattr(our_config, key, value)
    ours = build_and_verify(our_config, theirs.state_dict())
    return ours.eval(), theirs.eval()


# ----------------------------------------------------------------------------- inputs


def padded_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images of (height, width) `sizes`, zero-padded bottom/right to the batch maximum.

    Returns pixel_values (B, 3, H, W) float32 and pixel_mask (B, H, W) int64 (1 on real pixels).
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def random_labels(num_images: int, num_labels: int = 91, seed: int = 0, min_boxes: int = 1,
                  max_boxes: int = 12) -> list[dict]:
    """One target dict per image: `class_labels` (n,) int64, `boxes` (n, 4) normalised cxcywh inside [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for _ in range(num_images):
        n = int(torch.randint(min_boxes, max_boxes + 1, (), generator=generator))
        wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.05
        centre = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
        labels.append({"class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                       "boxes": torch.cat([centre, wh], dim=1)})
    return labels


def photo_like(width: int, height: int, seed: int) -> PIL.Image.Image:
    """A photo-like RGB image: smooth colour gradients, a few solid rectangles and ellipses, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(x / width * 3 + seed),
                      128 + 100 * np.cos(y / height * 2 + seed),
                      128 + 80 * np.sin((x + y) / (width + height) * 5)], axis=-1)
    for k in range(6):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        w, h = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
        colour = rng.integers(0, 256, 3)
        if k % 2:
            image[y0:y0 + h, x0:x0 + w] = colour
        else:  # ellipse
            inside = ((x - x0 - w / 2) / (w / 2)) ** 2 + ((y - y0 - h / 2) / (h / 2)) ** 2 <= 1
            image[inside] = colour
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


# (width, height) of the photos: landscape and portrait, VGA to the DETR maximum
PHOTO_SIZES = [(640, 480), (1333, 800), (800, 600), (480, 640), (1024, 768), (1280, 720), (800, 1333), (960, 640)]
