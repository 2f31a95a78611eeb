"""Benchmark: peak memory of one DETR-R50 training step with and without gradient checkpointing.

Each mode runs in a fresh process (a process's peak memory never goes down): build our DETR-R50 (random weights, the
paper's config, dropout 0.1), then one training step on a zero-padded batch of random images: forward with labels
(auxiliary losses on every decoder layer) and backward. `model.activation_checkpointing_enable()` checkpoints every
encoder and decoder layer and the backbone stages timm checkpoints (all but the stem convolution and the last stage).

Memory: on CPU the peak resident set size (VmHWM) minus the resident size after building the model, on CUDA
`torch.cuda.max_memory_allocated` minus the memory allocated after building it; both modes report their loss, which
must be equal (checkpointing recomputes the same forward, dropout masks included).

    python benchmarks/bench_memory.py                  # CPU, batch 2 at ~800 px (the paper's training size)
    python benchmarks/bench_memory.py --quick          # batch 2 at ~320 px, about a minute on 2 CPU cores
    python benchmarks/bench_memory.py --device cuda --output results/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import configure_threads, environment, padded_batch, peak_rss_mib, random_labels, write_json  # noqa: E402

MODES = ("off", "on")
FULL_SIZES = [(800, 1066), (800, 1200)]
QUICK_SIZES = [(320, 426), (320, 480)]


def allocated_mib(device: str) -> float:
    """Memory in use now: CUDA allocations, or this process's resident set size on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status: CPU memory is measured on Linux only")


def peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mib()


def run_step(mode: str, sizes: list[tuple[int, int]], device: str) -> dict[str, Any]:
    """One training step of DETR-R50 in this process; the memory it took and its loss."""
    from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection

    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig()).to(device).train()
    if mode == "on":
        model.activation_checkpointing_enable()
    pixel_values, pixel_mask = padded_batch(sizes, seed=1)
    labels = [{k: v.to(device) for k, v in t.items()} for t in random_labels(len(sizes), seed=2)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    built = allocated_mib(device)
    torch.manual_seed(3)  # the same dropout masks in both modes
    loss = model(pixel_values.to(device), pixel_mask.to(device), labels=labels).loss
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = peak_mib(device)
    return {"mode": mode, "loss": loss.item(), "after_build_mib": built, "peak_mib": peak, "step_mib": peak - built}


def run_in_fresh_process(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--device", args.device, "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    return json.loads(lines[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~320 px images: about a minute on 2 CPU cores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    configure_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.child:
        print(json.dumps(run_step(args.child, sizes, args.device)))
        return {}
    result: dict[str, Any] = {"benchmark": "DETR-R50 training step memory, gradient checkpointing off / on",
                              "environment": environment(args.device), "image_sizes": sizes,
                              "modes": {mode: run_in_fresh_process(mode, args) for mode in MODES}}
    off, on = result["modes"]["off"], result["modes"]["on"]
    result["step_memory_ratio_on_over_off"] = on["step_mib"] / off["step_mib"]
    result["loss_difference"] = abs(on["loss"] - off["loss"])
    unit = "allocated" if args.device.startswith("cuda") else "RSS"
    print(f"batch {len(sizes)}, images {sizes}, {args.device}: memory of one training step ({unit}, peak minus "
          f"after build)")
    for mode in MODES:
        r = result["modes"][mode]
        print(f"  checkpointing {mode:<3}: {r['step_mib']:7.0f} MiB (peak {r['peak_mib']:.0f}, after build "
              f"{r['after_build_mib']:.0f}), loss {r['loss']:.6f}")
    print(f"  ratio on / off: {result['step_memory_ratio_on_over_off']:.3f}; |loss difference| "
          f"{result['loss_difference']:.2e}")
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
