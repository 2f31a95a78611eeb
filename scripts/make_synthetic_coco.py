"""Write a synthetic COCO-format shapes dataset (see modeling_detr_custom/synthetic.py).

Example:
    python scripts/make_synthetic_coco.py --out-dir data/shapes --num-train 256 --num-val 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_detr_custom.synthetic import make_synthetic_coco  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, help="folder to write images/ and annotations/ into")
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128, help="side of the square images, pixels")
    p.add_argument("--min-shapes", type=int, default=1)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=3, help="1-4: circle, square, triangle, bar")
    p.add_argument("--category-ids", type=int, nargs="+", default=None,
                   help="COCO ids of the classes (default 1..num-classes); gaps mimic COCO")
    p.add_argument("--noise-std", type=float, default=8.0, help="background noise on half the images")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    paths = make_synthetic_coco(a.out_dir, num_train=a.num_train, num_val=a.num_val, image_size=a.image_size,
                                min_shapes=a.min_shapes, max_shapes=a.max_shapes, num_classes=a.num_classes,
                                seed=a.seed, noise_std=a.noise_std, category_ids=a.category_ids)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
