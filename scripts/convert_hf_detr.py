"""Convert a published DETR checkpoint into a detr-custom folder.

    python scripts/convert_hf_detr.py --hf_model DIR --output_dir OUT
    python scripts/convert_hf_detr.py --original_checkpoint detr-r50.pth --output_dir OUT

The output loads with AutoModelForObjectDetection.from_pretrained(OUT, trust_remote_code=True).
Nothing is written unless the converted model matches transformers' DETR on a random batch.
"""

from __future__ import annotations

import argparse

from modeling_detr_custom.conversion import convert_hf_folder, convert_original_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf_model", help="transformers DetrForObjectDetection folder (v5 or v4 keys)")
    source.add_argument("--original_checkpoint", help="facebookresearch/detr .pth with {'model': state_dict}")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--backbone", default="resnet50", help="timm backbone of an original checkpoint")
    parser.add_argument("--dilation", action="store_true", help="original checkpoint is DC5")
    parser.add_argument("--num_heads", type=int, default=8, help="attention heads of an original checkpoint")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest output difference accepted")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.hf_model:
        convert_hf_folder(args.hf_model, args.output_dir, args.atol)
    else:
        convert_original_checkpoint(args.original_checkpoint, args.output_dir, args.backbone,
                                    args.dilation, args.num_heads, args.atol)
    print(f"converted model written to {args.output_dir}")


if __name__ == "__main__":
    main()
