#!/usr/bin/env python
"""Write a synthetic COCO-format (or YOLO-format) shapes dataset (see modeling_detr_custom/data/synthetic.py).

    python scripts/make_synthetic_coco.py --output_dir data/shapes --num_train 256 --num_val 32
    python scripts/make_synthetic_coco.py --output_dir data/shapes_yolo --format yolo

The folder holds images/{train,val}/*.png and annotations/instances_{train,val}.json; train on it with
`scripts/train.py --coco_dir data/shapes`. With --format yolo it holds the same images and boxes in the
ultralytics layout, data.yaml + images/{train,val}/ + labels/{train,val}/*.txt; train on it with
`scripts/train.py --yolo_dir data/shapes_yolo`. Defaults draw 64 train and 16 val images of 128 px.
"""

from __future__ import annotations

import argparse

from modeling_detr_custom.data import make_synthetic_coco


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="folder to write images/ and annotations/ (or labels/) into")
    p.add_argument("--format", choices=("coco", "yolo"), default="coco",
                   help="coco: annotations/instances_<split>.json; yolo: data.yaml + labels/<split>/*.txt")
    p.add_argument("--num_train", type=int, default=64)
    p.add_argument("--num_val", type=int, default=16)
    p.add_argument("--image_size", type=int, default=128, help="side of the square images, pixels")
    p.add_argument("--min_shapes", type=int, default=1)
    p.add_argument("--max_shapes", type=int, default=3)
    p.add_argument("--num_classes", type=int, default=3, help="1-4: circle, square, triangle, bar")
    p.add_argument("--category_ids", type=int, nargs="+", default=None,
                   help="COCO ids of the classes (default 1..num_classes); gaps mimic COCO")
    p.add_argument("--noise_std", type=float, default=8.0, help="background noise on half the images")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    paths = make_synthetic_coco(a.output_dir, num_train=a.num_train, num_val=a.num_val, image_size=a.image_size,
                                min_shapes=a.min_shapes, max_shapes=a.max_shapes, num_classes=a.num_classes,
                                seed=a.seed, noise_std=a.noise_std, category_ids=a.category_ids, format=a.format)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
