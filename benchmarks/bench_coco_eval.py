"""COCO box evaluation time: faster-coco-eval against pycocotools on the same predictions (issue 14).

    python benchmarks/bench_coco_eval.py --images 5000 --detections 100 --repeats 3 --output coco_eval.json

Ground truth like COCO val (5000 images of 640x480, 0-15 boxes of 80 categories, 1% crowd), DETR-style
predictions (100 per image, every query kept): jittered copies of the ground truth (scores 0.4-1) plus random
boxes (scores 0-0.6). Each repeat times `coco_box_ap` with both engines, alternating; reports the medians, the
ratio faster / pycocotools, and the largest difference between the two engines' 12 numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, summarise, time_wall_and_cpu, write_json  # noqa: E402

from modeling_detr_custom.coco_metric import STAT_NAMES, coco_box_ap  # noqa: E402


def references(num_images: int, rng: np.random.Generator) -> list[dict]:
    """Per-image ground truth: absolute COCO xywh boxes, category ids 1..80, areas, crowd flags."""
    refs = []
    for image_id in range(num_images):
        n = int(rng.integers(0, 16))
        wh = rng.choice([16, 40, 100, 250], size=(n, 1)) * rng.uniform(0.7, 1.3, size=(n, 2))
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([640, 480]) - wh)
        boxes = np.concatenate([xy, wh], 1)
        refs.append({"image_id": image_id, "boxes": boxes.tolist(), "category_ids": rng.integers(1, 81, n).tolist(),
                     "area": (wh[:, 0] * wh[:, 1]).tolist(), "iscrowd": (rng.random(n) < 0.01).astype(int).tolist()})
    return refs


def predictions(refs: list[dict], per_image: int, rng: np.random.Generator) -> list[dict]:
    """``per_image`` detections per image: jittered ground truth first, random boxes for the rest."""
    preds = []
    for ref in refs:
        gt = np.asarray(ref["boxes"], dtype=float).reshape(-1, 4)[:per_image]
        jittered = gt + rng.normal(0, 0.1, gt.shape) * gt[:, [2, 3, 2, 3]]
        wh = rng.uniform(8, 300, size=(per_image - len(gt), 2))
        xy = rng.uniform(0, 1, size=(len(wh), 2)) * (np.array([640, 480]) - np.minimum(wh, [639, 479]))
        boxes = np.concatenate([jittered, np.concatenate([xy, wh], 1)])
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + np.abs(boxes[:, 2:]) + 1], 1)
        labels = list(ref["category_ids"][:per_image]) + rng.integers(1, 81, len(wh)).tolist()
        scores = np.concatenate([rng.uniform(0.4, 1.0, len(gt)), rng.uniform(0.0, 0.6, len(wh))])
        preds.append({"image_id": ref["image_id"], "boxes": xyxy.tolist(), "scores": scores.tolist(), "labels": labels})
    return preds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--detections", type=int, default=100, help="per image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", help="JSON file for the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    refs = references(args.images, rng)
    preds = predictions(refs, args.detections, rng)
    outputs: dict[str, dict] = {}

    def run(backend: str) -> None:
        outputs[backend] = coco_box_ap(preds, refs, backend=backend)

    times = time_wall_and_cpu({"faster": lambda: run("faster"), "pycocotools": lambda: run("pycocotools")},
                              warmup=0, repeats=args.repeats)
    worst = max(abs(outputs["faster"][k] - outputs["pycocotools"][k]) for k in STAT_NAMES)
    result = {"environment": environment("cpu"), "images": args.images, "detections_per_image": args.detections,
              "faster": summarise(times["faster"]["wall_s"]), "pycocotools": summarise(times["pycocotools"]["wall_s"]),
              "ratio_faster_over_pycocotools": times["faster"]["wall"]["median_s"]
              / times["pycocotools"]["wall"]["median_s"],
              "max_metric_difference": worst, "AP": outputs["pycocotools"]["AP"]}
    print(f"{args.images} images x {args.detections} detections: faster-coco-eval "
          f"{result['faster']['median_s']:.1f} s, pycocotools {result['pycocotools']['median_s']:.1f} s, ratio "
          f"{result['ratio_faster_over_pycocotools']:.3f}; max |metric difference| {worst:.2e} (AP {result['AP']:.3f})")
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
