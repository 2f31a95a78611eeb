"""Benchmark: our DETR vs transformers' DetrForObjectDetection with identical weights, side by side.

Both models are built in this process with the same random weights (through `conversion.build_and_verify`, which
checks that they agree within 1e-4) and timed alternately, repeat by repeat, after a warm-up. Each path reports
the median, the quartiles and min/max of the wall time, the same for the process CPU time (robust when other
processes share the machine), and the ratio ours / transformers of the medians (< 1: ours is faster).

Paths (`--paths`, default all):
  forward   model-only eval forward on a zero-padded batch of random images (inference_mode)
  pipeline  photos (PIL) -> image processor -> model -> post_process_object_detection: ours =
            DetrCustomImageProcessor + our model + its post-processing; transformers = DetrImageProcessor
            (torchvision backend, its default) + DetrForObjectDetection + its post-processing
  train     training step: forward + loss (auxiliary losses on every decoder layer, as the paper trains)
            + backward + AdamW step (lr 1e-4, backbone 1e-5, weight decay 1e-4), dropouts of the original
            (0.1 everywhere) on both
  loss      loss with Hungarian matching alone, six decoder layers at batch 8: ours `model.criterion(logits
            (L, B, Q, C+1), boxes (L, B, Q, 4), labels)` vs transformers' `ForObjectDetectionLoss` with
            auxiliary outputs
  rss       peak RSS of a fresh process that builds one model and runs the eval forward (one per implementation)

    python benchmarks/bench_model.py                       # CPU fp32, batch 2, ~800 px (the issue-6 targets)
    python benchmarks/bench_model.py --quick               # about a minute on 2 CPU cores (smaller images)
    python benchmarks/bench_model.py --paths forward train --output results/model.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_pair,
    configure_threads,
    environment,
    padded_batch,
    peak_rss_mib,
    photo_like,
    random_labels,
    time_wall_and_cpu,
    write_json,
)

PATHS = ("forward", "pipeline", "train", "loss", "rss")
FULL = {"sizes": [(800, 1066), (800, 1200)], "photo_batches": [[(640, 480), (1333, 800)], [(800, 1333), (1024, 768)]],
        "warmup": 1, "repeats": {"forward": 7, "pipeline": 5, "train": 5, "loss": 50}, "max_size": 1333,
        "shortest_edge": 800}
QUICK = {"sizes": [(320, 426), (320, 480)], "photo_batches": [[(640, 480), (1333, 800)]], "warmup": 1,
         "repeats": {"forward": 3, "pipeline": 3, "train": 3, "loss": 5}, "max_size": 533, "shortest_edge": 320}


# ----------------------------------------------------------------------------- timing


def time_alternating(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, dict]:
    """`common.time_wall_and_cpu` of "ours" and "transformers", with the ratios ours / transformers."""
    result: dict[str, Any] = time_wall_and_cpu(fns, warmup, repeats, device)
    result["ratio_ours_over_transformers"] = {
        kind: result["ours"][kind]["median_s"] / result["transformers"][kind]["median_s"] for kind in ("wall", "cpu")}
    # the fastest repeats are the least disturbed by other processes: a second, load-robust estimate
    result["ratio_of_minimum_wall"] = result["ours"]["wall"]["min_s"] / result["transformers"]["wall"]["min_s"]
    return result


def report(title: str, result: dict[str, Any], images_per_call: int) -> None:
    print(f"\n== {title}")
    for name in [k for k in result if isinstance(result[k], dict) and "wall_s" in result[k]]:
        w, c = result[name]["wall"], result[name]["cpu"]
        print(f"  {name:<13} wall median {w['median_s']:8.3f} s (IQR {w['q1_s']:.3f}-{w['q3_s']:.3f}, min-max "
              f"{w['min_s']:.3f}-{w['max_s']:.3f}, n={w['repeats']}) {images_per_call / w['median_s']:6.2f} img/s"
              f" | cpu median {c['median_s']:8.3f} s")
    r = result["ratio_ours_over_transformers"]
    print(f"  ratio ours / transformers: wall {r['wall']:.3f}   cpu {r['cpu']:.3f}   "
          f"(fastest repeats: {result['ratio_of_minimum_wall']:.3f})")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- paths


def bench_forward(ours, theirs, settings, args) -> dict:
    pixel_values, pixel_mask = padded_batch(settings["sizes"], seed=1)
    pixel_values, pixel_mask = pixel_values.to(args.device), pixel_mask.to(args.device)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(model):
        def call():
            with torch.inference_mode(), autocast:
                return model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return call

    a, b = run(ours)(), run(theirs)()
    diff = {"logits": (a.logits.float() - b.logits.float()).abs().max().item(),
            "pred_boxes": (a.pred_boxes.float() - b.pred_boxes.float()).abs().max().item()}
    print(f"forward: max |ours - transformers| {diff}")
    fns = {"ours": run(ours), "transformers": run(theirs)}
    if args.compile:  # inductor: minutes of C++ codegen on a small CPU, so only on request
        start = time.perf_counter()
        fns["ours_compiled"] = run(torch.compile(ours, fullgraph=True))
        fns["ours_compiled"]()
        print(f"compiled ours in {time.perf_counter() - start:.0f} s")
    result = time_alternating(fns, settings["warmup"], args.repeats or settings["repeats"]["forward"], args.device)
    if args.compile:
        result["ratio_ours_compiled_over_transformers"] = {
            kind: result["ours_compiled"][kind]["median_s"] / result["transformers"][kind]["median_s"]
            for kind in ("wall", "cpu")}
    result.update(batch_size=len(settings["sizes"]), image_sizes_hw=settings["sizes"],
                  padded_shape=list(pixel_values.shape), dtype=args.dtype, max_abs_diff=diff)
    report(f"model-only eval forward, batch {len(settings['sizes'])}, padded {tuple(pixel_values.shape[-2:])}, "
           f"{args.dtype}", result, len(settings["sizes"]))
    return result


def bench_pipeline(ours, theirs, settings, args) -> dict:
    from transformers import DetrImageProcessor

    from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor

    size = {"shortest_edge": settings["shortest_edge"], "longest_edge": settings["max_size"]}
    our_processor = DetrCustomImageProcessor(size=size)
    their_processor = DetrImageProcessor(size=size)  # torchvision backend, transformers' default
    batches = [[photo_like(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
               for i, sizes in enumerate(settings["photo_batches"])]
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(processor, model):
        def call():
            detections = []
            for images in batches:
                with torch.inference_mode():
                    inputs = processor(images, return_tensors="pt").to(args.device)
                    with autocast:
                        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
                    target_sizes = [(image.height, image.width) for image in images]
                    detections += processor.post_process_object_detection(outputs, threshold=0.0,
                                                                           target_sizes=target_sizes)
            return detections
        return call

    a, b = run(our_processor, ours)(), run(their_processor, theirs)()
    diff = max((x["boxes"] - y["boxes"]).abs().max().item() for x, y in zip(a, b))
    print(f"pipeline: max |box ours - transformers| {diff:.3g} px (the processors' resizing differs slightly)")
    result = time_alternating({"ours": run(our_processor, ours), "transformers": run(their_processor, theirs)},
                              settings["warmup"], args.repeats or settings["repeats"]["pipeline"], args.device)
    num_images = sum(len(b) for b in batches)
    result.update(batch_size=len(batches[0]), num_batches=len(batches), photo_sizes_wh=settings["photo_batches"],
                  processor_size=size, dtype=args.dtype, max_abs_box_diff_px=diff)
    report(f"end-to-end pipeline on photos, {len(batches)} batch(es) of {len(batches[0])}, {args.dtype}",
           result, num_images)
    return result


def bench_train(ours, theirs, settings, args) -> dict:
    pixel_values, pixel_mask = padded_batch(settings["sizes"], seed=2)
    pixel_values, pixel_mask = pixel_values.to(args.device), pixel_mask.to(args.device)
    labels = [{k: v.to(args.device) for k, v in t.items()}
              for t in random_labels(len(settings["sizes"]), ours.config.num_labels, seed=3)]
    if args.freeze_transformers_stem:  # the original (and ours) freeze the backbone stem and layer1
        for name, parameter in theirs.model.backbone.named_parameters():
            if not any(f"layer{i}" in name for i in (2, 3, 4)):
                parameter.requires_grad_(False)
    theirs.config.auxiliary_loss = True  # as the paper trains (compute is the same as without its departure)

    def make_step(model):
        backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
        rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4,
                                      weight_decay=1e-4)

        def step():
            model.train()
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for name, m in (("ours", ours), ("transformers", theirs))}
    result = time_alternating({"ours": make_step(ours), "transformers": make_step(theirs)}, settings["warmup"],
                              args.repeats or settings["repeats"]["train"], args.device)
    result.update(batch_size=len(settings["sizes"]), image_sizes_hw=settings["sizes"],
                  padded_shape=list(pixel_values.shape), dtype=args.dtype, trainable_parameters=trainable,
                  transformers_stem_frozen=args.freeze_transformers_stem,
                  dropout="0.1 residual, 0.1 attention, 0.1 activation on both")
    ours.eval(), theirs.eval()
    report(f"training step (fwd + loss + bwd + AdamW), batch {len(settings['sizes'])}, "
           f"padded {tuple(pixel_values.shape[-2:])}, {args.dtype}; trainable params {trainable}", result,
           len(settings["sizes"]))
    return result


def bench_loss(ours, theirs, settings, args) -> dict:
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    layers, batch, queries, classes = 6, 8, 100, ours.config.num_labels + 1
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(layers, batch, queries, classes, generator=generator) * 2).to(args.device)
    boxes = torch.cat([torch.rand(layers, batch, queries, 2, generator=generator) * 0.8 + 0.1,
                       torch.rand(layers, batch, queries, 2, generator=generator) * 0.3 + 0.02], -1).to(args.device)
    logits.requires_grad_(True), boxes.requires_grad_(True)
    labels = [{k: v.to(args.device) for k, v in t.items()}
              for t in random_labels(batch, classes - 1, seed=5, min_boxes=1, max_boxes=20)]
    config = theirs.config
    config.auxiliary_loss = True
    criterion = ours.criterion

    def run_ours():
        return criterion(logits, boxes, labels)

    def run_theirs():
        return ForObjectDetectionLoss(logits[-1], labels, logits.device, boxes[-1], config,
                                      outputs_class=logits, outputs_coord=boxes)

    (loss_a, dict_a), (loss_b, dict_b, _) = run_ours(), run_theirs()
    rel = max(abs(dict_a[k].item() - dict_b[k].item()) / max(abs(dict_b[k].item()), 1e-12)
              for k in dict_b if k in dict_a and not k.startswith(("cardinality", "class_error")))
    print(f"loss: total ours {loss_a.item():.6f} transformers {loss_b.item():.6f}, max relative term difference "
          f"{rel:.2e}")
    result = time_alternating({"ours": run_ours, "transformers": run_theirs}, max(settings["warmup"], 2),
                              args.repeats or settings["repeats"]["loss"], args.device)
    result.update(decoder_layers=layers, batch_size=batch, num_queries=queries, num_classes_with_no_object=classes,
                  target_boxes=sum(len(t["boxes"]) for t in labels), max_relative_term_difference=rel)
    report(f"loss with matching, {layers} layers, batch {batch}, {queries} queries", result, batch)
    return result


def bench_rss(settings, args) -> dict:
    """Peak RSS of a fresh process per implementation (the two models in this process would mix)."""
    out = {}
    for impl in ("ours", "transformers"):
        command = [sys.executable, __file__, "--rss-child", impl, "--threads", str(args.threads or 0)]
        command += ["--quick"] if args.quick else []
        lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        out[impl] = json.loads(lines[-1])
    out["ratio_ours_over_transformers"] = out["ours"]["peak_rss_mib"] / out["transformers"]["peak_rss_mib"]
    print(f"\n== peak RSS, CPU eval forward, batch {len(settings['sizes'])}: ours {out['ours']['peak_rss_mib']:.0f} MiB"
          f" (after build {out['ours']['rss_after_build_mib']:.0f}), transformers "
          f"{out['transformers']['peak_rss_mib']:.0f} MiB "
          f"(after build {out['transformers']['rss_after_build_mib']:.0f})"
          f", ratio {out['ratio_ours_over_transformers']:.3f}")
    return out


def rss_child(impl: str, settings) -> None:
    from transformers import DetrConfig, DetrForObjectDetection

    from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection

    if impl == "ours":
        model = DetrCustomForObjectDetection(DetrCustomConfig()).eval()
    else:
        model = DetrForObjectDetection(DetrConfig(use_timm_backbone=True, backbone="resnet50",
                                                  use_pretrained_backbone=False)).eval()
    pixel_values, pixel_mask = padded_batch(settings["sizes"], seed=1)
    built = peak_rss_mib()
    with torch.inference_mode():
        model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "rss_after_build_mib": built}))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--quick", action="store_true", help="small images, few repeats: about a minute on 2 cores")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per path (overrides the defaults)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--freeze-transformers-stem", action="store_true",
                        help="train step: freeze transformers' backbone stem and layer1 like the original and ours "
                             "(transformers leaves them trainable with a timm backbone)")
    parser.add_argument("--compile", action="store_true",
                        help="forward path: also time torch.compile(ours) (inductor; minutes to compile on a CPU)")
    parser.add_argument("--ours-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override our config (e.g. backbone_channels_last=false) to measure a change")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--rss-child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value.lower()) if value.lower() in ("true", "false") else json.loads(value) \
            if value.replace(".", "", 1).lstrip("-").isdigit() else value
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    if args.warmup is not None:
        settings["warmup"] = args.warmup
    if args.rss_child:
        rss_child(args.rss_child, settings)
        return {}
    paths = [p for p in PATHS if p in args.paths]
    result: dict[str, Any] = {"benchmark": "DETR model: ours vs transformers, identical weights",
                              "environment": environment(args.device), "quick": args.quick,
                              "ours_config_overrides": parse_overrides(args.ours_config), "paths": {}}
    print(json.dumps(result["environment"]))
    if set(paths) - {"rss"}:
        start = time.perf_counter()
        ours, theirs = build_pair(ours_overrides=result["ours_config_overrides"], dropout=0.1,
                                  attention_dropout=0.1, activation_dropout=0.1)
        ours, theirs = ours.to(args.device), theirs.to(args.device)
        print(f"built both models with identical weights in {time.perf_counter() - start:.1f} s")
    benches = {"forward": bench_forward, "pipeline": bench_pipeline, "train": bench_train, "loss": bench_loss}
    for path in paths:
        if path == "rss":
            result["paths"]["rss"] = bench_rss(settings, args)
        else:
            result["paths"][path] = benches[path](ours, theirs, settings, args)
        write_json(result, args.output)  # after every path, so a long run leaves partial results
    print("\nsummary (ratio ours / transformers of the medians, wall | cpu):")
    for path, r in result["paths"].items():
        ratio = r["ratio_ours_over_transformers"]
        print(f"  {path:<9} " + (f"{ratio['wall']:.3f} | {ratio['cpu']:.3f}" if isinstance(ratio, dict)
                                 else f"{ratio:.3f} (peak RSS)"))
    return result


if __name__ == "__main__":
    main()
