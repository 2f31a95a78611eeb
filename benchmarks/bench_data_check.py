"""Benchmark: what the data check (data/inspection.py, data/box_format.py) adds to the up-front load of a dataset.

A COCO folder of N images (default 10,000), each a small solid PNG of its own size (every size distinct: the worst
case for the check's per-size resize arithmetic) with 1-10 random boxes of 80 categories. Timed in one process, in
alternation (wall and process CPU, median of the repeats):

* ``load``: ``load_coco_folder_with_info`` with its datasets cache warm, the up-front work every run does (probe every
  image header, clean every annotation, recognise the box format, open the cached dataset);
* ``box_format``: the box-format recognition alone on the same boxes (part of ``load``);
* ``check``: ``check_dataset`` on the loaded split with training's settings (DETR-R50's queries, stride and resizes
  with augmentation);
* ``saved_load`` / ``saved_check``: the same split as a ``save_to_disk`` dataset: ``load_detection_dataset`` (its
  box-format recognition included) and the check.

The number asked for is the check's share of the load as it was before the check existed:
``(check + box_format) / (load - box_format)``, to stay under 0.10.

    python benchmarks/bench_data_check.py [--images N] [--repeats R] [--threads T] [--output FILE]

Torch threads default to 1: the loader's clip and the box-format recognition run small tensor ops, which on a
machine whose cores are busy take many times longer on two threads than on one (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from benchmarks.common import configure_threads, environment, time_wall_and_cpu, write_json  # noqa: E402
from modeling_detr_custom.data import (  # noqa: E402
    CheckSettings,
    check_dataset,
    find_box_format,
    load_coco_folder_with_info,
    load_detection_dataset,
)
from modeling_detr_custom.data.schema import box_columns  # noqa: E402


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def make_folder(root: Path, num_images: int, seed: int = 0) -> Path:
    """``root/annotations/instances_train.json`` + ``root/images/train/*.png`` (module docstring)."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images" / "train"
    image_dir.mkdir(parents=True)
    pairs = rng.choice(500 * 500, size=num_images, replace=False)  # each (width, height) distinct, 200..699 px
    sides = np.stack([200 + pairs // 500, 200 + pairs % 500], axis=1)
    images, annotations = [], []
    for i, (width, height) in enumerate(sides.tolist(), start=1):
        (image_dir / f"{i:06d}.png").write_bytes(png_bytes(width, height))
        images.append({"id": i, "file_name": f"{i:06d}.png", "width": width, "height": height})
        for _ in range(int(rng.integers(1, 11))):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(rng.integers(1, 81)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def r50_settings() -> CheckSettings:
    """Training's settings for DETR-R50: 100 queries, stride 32, 800/1333 and the augmentation's resizes."""
    resizes = ((800, 1333), (480, 1333), (800, 1333), (400, None), (600, None))
    return CheckSettings(num_queries=100, stride=32, resizes=resizes, train_split="train")


def run(num_images: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "coco", num_images)
        cache = str(Path(tmp) / "cache")
        data = load_coco_folder_with_info(folder, cache_dir=cache)  # cold: builds the cache
        coco = json.loads((folder / "annotations" / "instances_train.json").read_text())
        sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
        raw = torch.tensor([a["bbox"] for a in coco["annotations"]], dtype=torch.float64)
        wh = torch.tensor([sizes[a["image_id"]] for a in coco["annotations"]], dtype=torch.float64)
        saved = Path(tmp) / "saved"
        data.dataset.save_to_disk(str(saved))
        saved_data = load_detection_dataset(dataset_path=saved)
        settings = r50_settings()
        fns = {
            "load": lambda: load_coco_folder_with_info(folder, cache_dir=cache),
            "box_format": lambda: find_box_format(raw, wh[:, 0], wh[:, 1], "xywh"),
            "check": lambda: check_dataset(data, ["train"], settings),
            "saved_load": lambda: load_detection_dataset(dataset_path=saved),
            "saved_check": lambda: check_dataset(saved_data, ["train"], settings),
            "box_columns": lambda: box_columns(data.dataset["train"]),
        }
        times = time_wall_and_cpu(fns, warmup=1, repeats=repeats)
    med = {name: t["wall"]["median_s"] for name, t in times.items()}
    cpu = {name: t["cpu"]["median_s"] for name, t in times.items()}
    before = med["load"] - med["box_format"]
    return {
        "environment": environment("cpu"), "images": num_images, "boxes": int(raw.shape[0]),
        "median_wall_s": med, "median_cpu_s": cpu,
        "check_share_of_load_wall": (med["check"] + med["box_format"]) / before,
        "check_share_of_load_cpu": (cpu["check"] + cpu["box_format"]) / (cpu["load"] - cpu["box_format"]),
        "times": {name: {"wall": t["wall"], "cpu": t["cpu"]} for name, t in times.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--output", help="write the result as JSON")
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    result = run(args.images, args.repeats)
    print(f"{result['images']} images, {result['boxes']} boxes; median wall s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["median_wall_s"].items()))
    print(f"check + box-format recognition / load before them: wall {result['check_share_of_load_wall']:.3f}, "
          f"cpu {result['check_share_of_load_cpu']:.3f}")
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
