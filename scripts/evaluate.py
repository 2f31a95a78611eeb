"""COCO box AP of a saved detr-custom folder on a dataset split; prints and writes the metrics as JSON.

    python scripts/evaluate.py --model outputs/demo                      # the synthetic default's val split
    python scripts/evaluate.py --model outputs/r50 --coco_dir /data/coco --split val
    accelerate launch --num_processes 8 scripts/evaluate.py --model DIR --dataset_name cppe-5 --split test

Predicted labels are mapped to the dataset's category ids with the mapping saved at training
(`label_to_category_id` in config.json), else the dataset's own (raw COCO ids by default,
`--contiguous_labels` for 0..K-1). Every query is kept, as the original DETR evaluates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# `python scripts/x.py` puts scripts/ first on sys.path, where evaluate.py would shadow the `evaluate`
# package; drop it, and add the checkout so the package imports without installing
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_detr_custom.checks import DEBUG_ENV, run_cli  # noqa: E402
from modeling_detr_custom.training import SYNTHETIC_DEFAULTS, evaluate_folder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by scripts/train.py (or any detr-custom folder)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--coco_dir", help="COCO folder: annotations/instances_<split>.json + image folders")
    source.add_argument("--dataset_path", help="a datasets.save_to_disk folder with the detection schema")
    source.add_argument("--dataset_name", help="a Hub detection dataset")
    p.add_argument("--split", help="default: validation/val/valid/test, the first that exists")
    p.add_argument("--contiguous_labels", action=argparse.BooleanOptionalAction, default=None,
                   help="dataset labels 0..K-1 (default: as the model was trained)")
    p.add_argument("--batch_size", type=int, default=8, help="per process")
    p.add_argument("--image_size", type=int, help="override the processor's short side")
    p.add_argument("--max_eval_samples", type=int)
    p.add_argument("--cache_dir", help="synthetic data and datasets cache (default ~/.cache/detr_custom)")
    p.add_argument("--on_bad_data", choices=("skip", "raise"), default="skip")
    p.add_argument("--full_decode_check", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--output_file", help="default: <model>/eval_results_<split>.json")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of an error, not only its one-line message (or set {DEBUG_ENV}=1)")
    for key, value in SYNTHETIC_DEFAULTS.items():
        p.add_argument(f"--synthetic_{key}", type=int, help=f"synthetic dataset (no dataset argument): {key} (default {value})")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1; got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = evaluate_folder(args)
    from accelerate import PartialState

    if PartialState().is_main_process:
        path = Path(args.output_file or Path(args.model) / f"eval_results_{result['split']}.json")
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
