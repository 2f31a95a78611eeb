"""GPU benchmark (issue 6): ours vs transformers' DETR-R50 with identical weights, one CUDA device.

One command, JSON to $OUT (default ./bench_out):

    OUT=${OUT:-./bench_out} python benchmarks/bench_gpu.py

Needs torch (CUDA), transformers and timm only. Measures, alternating ours and transformers in blocks:
  inference  bf16 autocast, model-only eval forward, batch 8 at 800x1200: images/s (ours eager, ours
             torch.compile, transformers eager), and ours with the backbone speed settings off (ablation)
  train      bf16 autocast, forward + loss (auxiliary losses) + backward + fused AdamW at 800 px: images/s
  memory     peak CUDA memory of a training step at batch 4 / 800 px, each model alone on the device
  syncs      host synchronisations (torch.cuda.set_sync_debug_mode) in our eval forward (target 0) and our
             training step (target 1: the matcher's one device-to-host transfer)
  pipeline   photos -> processor on the GPU -> model (bf16) -> post-processing, ours vs transformers
Targets (issue 6): inference >= 1.5x transformers' images/s; training >= 100 images/s; memory <= transformers'.
Use --skip to leave parts out, --quick for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PHOTO_SIZES, build_pair, environment, padded_batch, photo_like, random_labels, write_json  # noqa: E402

PARTS = ("syncs", "inference", "train", "memory", "pipeline")


def cuda_time(fn, iterations: int) -> float:
    """Seconds per iteration of `fn`, measured between two synchronisations."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def alternate(fns: dict, warmup: int, blocks: int, iterations: int, images_per_call: int) -> dict:
    """Blocks of `iterations` calls per implementation, alternating; median images/s over blocks."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    seconds = {name: [] for name in fns}
    names = list(fns)
    for block in range(blocks):
        for name in names if block % 2 == 0 else names[::-1]:
            seconds[name].append(cuda_time(fns[name], iterations))
    out = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        out[name] = {"median_s_per_call": median, "min_s": min(values), "max_s": max(values),
                     "images_per_s": images_per_call / median, "blocks": blocks, "iterations": iterations}
    return out


def count_syncs(fn) -> int:
    """Number of synchronising CUDA calls `fn` makes (torch.cuda.set_sync_debug_mode warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def batch(sizes, device="cuda"):
    pixel_values, pixel_mask = padded_batch(sizes, seed=1)
    return pixel_values.to(device), pixel_mask.to(device)


def eval_forward(model, pixel_values, pixel_mask, dtype=torch.bfloat16):
    def call():
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return call


def train_step(model, pixel_values, pixel_mask, labels):
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4,
                                  weight_decay=1e-4, fused=True)

    def step():
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # the original's recipe
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def cuda_labels(count, num_labels, seed):
    return [{k: v.cuda() for k, v in t.items()} for t in random_labels(count, num_labels, seed=seed)]


# ----------------------------------------------------------------------------- parts


def part_syncs(ours, theirs, args):
    pixel_values, pixel_mask = batch([(800, 1066), (800, 1200)])
    labels = cuda_labels(2, ours.config.num_labels, 3)
    step, _ = train_step(ours, pixel_values, pixel_mask, labels)
    forward = eval_forward(ours, pixel_values, pixel_mask)
    forward(), step()  # warm-up (lazy initialisations may synchronise once)
    out = {"ours_eval_forward": count_syncs(forward), "ours_train_step": count_syncs(step),
           "transformers_eval_forward": count_syncs(eval_forward(theirs, pixel_values, pixel_mask))}
    ours.eval()
    print(f"host synchronisations: {out}")
    return out


def part_inference(ours, theirs, args):
    sizes = [(800, 1200)] * args.infer_batch
    pixel_values, pixel_mask = batch(sizes)
    fns = {"ours": eval_forward(ours, pixel_values, pixel_mask),
           "transformers": eval_forward(theirs, pixel_values, pixel_mask)}
    if not args.no_compile:
        try:
            start = time.perf_counter()
            compiled = torch.compile(ours, fullgraph=True)
            eval_forward(compiled, pixel_values, pixel_mask)()
            torch.cuda.synchronize()
            print(f"compiled ours in {time.perf_counter() - start:.0f} s")
            fns["ours_compiled"] = eval_forward(compiled, pixel_values, pixel_mask)
        except Exception:  # report, keep the eager numbers
            traceback.print_exc()
    with torch.inference_mode():
        a, b = fns["ours"](), fns["transformers"]()
        diff = (a.pred_boxes.float() - b.pred_boxes.float()).abs().max().item()
    result = alternate(fns, args.warmup, args.blocks, args.iterations, len(sizes))
    result["ratio_images_per_s_ours_over_transformers"] = (
        result["ours"]["images_per_s"] / result["transformers"]["images_per_s"])
    if "ours_compiled" in result:
        result["ratio_images_per_s_ours_compiled_over_transformers"] = (
            result["ours_compiled"]["images_per_s"] / result["transformers"]["images_per_s"])
    result.update(batch_size=len(sizes), image_size_hw=[800, 1200], dtype="bf16 autocast",
                  max_abs_box_diff_bf16=diff)
    print(f"inference bf16 batch {len(sizes)} 800x1200: " + ", ".join(
        f"{k} {v['images_per_s']:.1f} img/s" for k, v in result.items() if isinstance(v, dict)))
    return result


def part_ablation(theirs, args):
    """Ours with the backbone speed settings off, to see what each does on this GPU."""
    sizes = [(800, 1200)] * args.infer_batch
    pixel_values, pixel_mask = batch(sizes)
    out = {}
    for name, overrides in {"fold_off": {"backbone_fold_batch_norm": False},
                            "channels_last_off": {"backbone_channels_last": False},
                            "both_off": {"backbone_fold_batch_norm": False, "backbone_channels_last": False},
                            "both_on": {}}.items():
        variant, _ = build_pair(ours_overrides=overrides, dropout=0.1, attention_dropout=0.1,
                                activation_dropout=0.1)
        variant = variant.cuda()
        res = alternate({name: eval_forward(variant, pixel_values, pixel_mask),
                         "transformers": eval_forward(theirs, pixel_values, pixel_mask)},
                        args.warmup, max(2, args.blocks // 2), args.iterations, len(sizes))
        out[name] = {"images_per_s": res[name]["images_per_s"],
                     "ratio_over_transformers": res[name]["images_per_s"] / res["transformers"]["images_per_s"]}
        del variant
        torch.cuda.empty_cache()
    print(f"ablation (bf16 inference): {out}")
    return out


def part_train(ours, theirs, args):
    sizes = [[(800, 1066), (800, 1200), (800, 1066), (800, 1333)][i % 4] for i in range(args.train_batch)]
    pixel_values, pixel_mask = batch(sizes)
    labels = cuda_labels(len(sizes), ours.config.num_labels, 3)
    theirs.config.auxiliary_loss = True
    step_ours, opt_ours = train_step(ours, pixel_values, pixel_mask, labels)
    step_theirs, opt_theirs = train_step(theirs, pixel_values, pixel_mask, labels)
    result = alternate({"ours": step_ours, "transformers": step_theirs}, args.warmup, args.blocks,
                       max(1, args.iterations // 2), len(sizes))
    result["ratio_images_per_s_ours_over_transformers"] = (
        result["ours"]["images_per_s"] / result["transformers"]["images_per_s"])
    result.update(batch_size=len(sizes), image_sizes_hw=sorted(set(sizes)), padded=list(pixel_values.shape),
                  dtype="bf16 autocast, fp32 weights, fused AdamW, grad clip 0.1")
    del opt_ours, opt_theirs
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    ours.eval(), theirs.eval()
    print(f"train bf16 batch {len(sizes)}: ours {result['ours']['images_per_s']:.1f} img/s, transformers "
          f"{result['transformers']['images_per_s']:.1f} img/s")
    return result


def part_memory(ours, theirs, args):
    """Peak memory of training steps at batch 4 / 800 px, each model alone on the device."""
    sizes = [(800, 1066), (800, 1200), (800, 1066), (800, 1333)]
    out = {}
    for name, model in (("ours", ours), ("transformers", theirs)):
        other = theirs if model is ours else ours
        other.cpu()
        torch.cuda.empty_cache()
        pixel_values, pixel_mask = batch(sizes)
        labels = cuda_labels(len(sizes), ours.config.num_labels, 3)
        step, optimizer = train_step(model, pixel_values, pixel_mask, labels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out[name] = {"peak_allocated_mib": peak / 2**20, "allocated_before_mib": before / 2**20,
                     "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
        del optimizer, step
        model.zero_grad(set_to_none=True)
        model.eval()
        other.cuda()
    out["ratio_peak_ours_over_transformers"] = (
        out["ours"]["peak_allocated_mib"] / out["transformers"]["peak_allocated_mib"])
    out.update(batch_size=4, image_sizes_hw=sizes, dtype="bf16 autocast")
    print(f"peak training memory batch 4: ours {out['ours']['peak_allocated_mib']:.0f} MiB, transformers "
          f"{out['transformers']['peak_allocated_mib']:.0f} MiB")
    return out


def part_pipeline(ours, theirs, args):
    from transformers import DetrImageProcessor

    from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor

    images = [photo_like(w, h, seed=i) for i, (w, h) in enumerate(PHOTO_SIZES)]
    processors = {"ours": (DetrCustomImageProcessor(), ours), "transformers": (DetrImageProcessor(), theirs)}

    def run(processor, model):
        def call():
            with torch.inference_mode():
                inputs = processor(images, return_tensors="pt", device="cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outputs = model(pixel_values=inputs["pixel_values"].cuda(), pixel_mask=inputs["pixel_mask"].cuda())
                return processor.post_process_object_detection(
                    outputs, threshold=0.5, target_sizes=[(im.height, im.width) for im in images])
        return call

    result = alternate({k: run(*v) for k, v in processors.items()}, 2, args.blocks, max(1, args.iterations // 4),
                       len(images))
    result["ratio_images_per_s_ours_over_transformers"] = (
        result["ours"]["images_per_s"] / result["transformers"]["images_per_s"])
    result.update(batch_size=len(images), photo_sizes_wh=PHOTO_SIZES, dtype="bf16 autocast",
                  processors_on="cuda")
    print(f"pipeline on GPU, 8 photos: ours {result['ours']['images_per_s']:.1f} img/s, transformers "
          f"{result['transformers']['images_per_s']:.1f} img/s")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS + ("ablation",))
    parser.add_argument("--quick", action="store_true", help="few iterations, no compile, no ablation")
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--output", default=None, help="JSON file (default $OUT/bench_gpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.blocks, args.iterations, args.no_compile = 1, 2, 2, True
        args.skip = list(args.skip) + ["ablation"]
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    out_dir = Path(os.environ.get("OUT", "./bench_out"))
    output = Path(args.output) if args.output else out_dir / "bench_gpu.json"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    result = {"benchmark": "DETR-R50 on GPU: ours vs transformers, identical weights",
              "environment": environment("cuda"), "args": vars(args), "parts": {}, "errors": {}}
    print(result["environment"])
    start = time.perf_counter()
    ours, theirs = build_pair(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    ours, theirs = ours.cuda(), theirs.cuda()
    print(f"built both models with identical weights in {time.perf_counter() - start:.0f} s")
    parts = {"syncs": part_syncs, "inference": part_inference, "train": part_train, "memory": part_memory,
             "pipeline": part_pipeline}
    for name in PARTS:
        if name in args.skip:
            continue
        try:
            result["parts"][name] = parts[name](ours, theirs, args)
        except Exception as error:  # one failing part must not lose the others
            traceback.print_exc()
            result["errors"][name] = repr(error)
            torch.cuda.empty_cache()
        write_json(result, output)
    if "ablation" not in args.skip:
        try:
            result["parts"]["ablation"] = part_ablation(theirs, args)
        except Exception as error:
            traceback.print_exc()
            result["errors"]["ablation"] = repr(error)
        write_json(result, output)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
