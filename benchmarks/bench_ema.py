"""What `--ema_decay` costs per training step: the step alone against the step plus the EMA update (issue 14).

    python benchmarks/bench_ema.py --models demo,r50 --repeats 20 --output ema.json

A step is forward, set loss, backward, clip 0.1 and fused AdamW, as the training loop does; "ema" adds
`ModelEMA.update` (one foreach lerp over the parameters, a copy of the buffers). Both run on the same model,
alternating within each repeat; the figure is the ratio of the medians (with EMA / without). `r50` is the
paper's model on a small 320 px batch of 1, where the update's share is largest (41M parameters, little compute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import random_batch  # noqa: E402
from common import configure_threads, environment, time_wall_and_cpu, write_json  # noqa: E402

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection  # noqa: E402
from modeling_detr_custom.training import MODEL_PRESETS, make_optimizer  # noqa: E402
from modeling_detr_custom.training.ema import ModelEMA  # noqa: E402

SETTINGS = {"demo": (64, 8), "r50": (320, 1)}  # preset -> (image size, batch)


def step_functions(name: str) -> tuple[dict, int]:
    """{"off": one training step, "ema": the same step + the EMA update}, and the parameter count."""
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig(**MODEL_PRESETS[name], num_labels=91)).train()
    optimizer = make_optimizer(model, argparse.Namespace(learning_rate=1e-4, backbone_learning_rate=1e-5,
                                                         weight_decay=1e-4))
    ema = ModelEMA(model, 0.9999, 2000)
    size, batch = SETTINGS[name]
    data = random_batch(batch, size, 91, "cpu")

    def step() -> None:
        model(**data).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_with_ema() -> None:
        step()
        ema.update(model)

    return {"off": step, "ema": step_with_ema}, sum(p.numel() for p in model.parameters())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,r50", help=f"comma-separated, of {sorted(SETTINGS)}")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", help="JSON file for the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = {"environment": environment("cpu"), "threads": configure_threads(args.threads), "models": {}}
    for name in args.models.split(","):
        fns, params = step_functions(name)
        times = time_wall_and_cpu(fns, warmup=2, repeats=args.repeats)
        ratio = times["ema"]["wall"]["median_s"] / times["off"]["wall"]["median_s"]
        result["models"][name] = {"image_size_batch": SETTINGS[name], "parameters_M": round(params / 1e6, 2),
                                  "off": times["off"]["wall"], "ema": times["ema"]["wall"], "ratio_ema_over_off": ratio}
        print(f"{name}: step {times['off']['wall']['median_s'] * 1e3:.1f} ms, with EMA "
              f"{times['ema']['wall']['median_s'] * 1e3:.1f} ms, ratio {ratio:.3f}")
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
