#!/usr/bin/env python
"""Export a saved detr-custom model to ONNX, verified with onnxruntime before it is written.

    python scripts/export_onnx.py --model outputs/demo --output detr.onnx [--opset 17] [--dynamic_batch]
        [--dynamic_size] [--height H --width W] [--overwrite] [--debug]

The graph takes pixel_values (B, 3, H, W) float32 and pixel_mask (B, H, W) int64 and returns logits (B, Q, C + 1)
and pred_boxes (B, Q, 4), normalised (cx, cy, w, h). B is 1 unless --dynamic_batch, H x W is --height x --width
(default: from the processor's pad_size or size) unless --dynamic_size. Beside FILE.onnx goes FILE.json: input and
output names and shapes, opset, id2label and the processor settings a runtime needs. Nothing is written unless
onnxruntime (CPU) gives PyTorch's outputs within 1e-4 on padded batches of two image sizes (and, when dynamic, two
batch sizes and two canvas sizes). Needs `pip install -e ".[export]"`.

The output never replaces a file of a model folder (MODEL/config.onnx would put its JSON over MODEL/config.json),
--overwrite or not. Exit status: 0 when both files are written, 1 when the model cannot be loaded, the output is
refused or cannot be written (read-only folder, disk full) or the export disagrees with PyTorch (one line on stderr
says why; its traceback with --debug or DETR_CUSTOM_DEBUG=1), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from modeling_detr_custom.checks import debug_requested
from modeling_detr_custom.export import DEFAULT_OPSET, OnnxExportError, export_onnx, sidecar_path
from modeling_detr_custom.predict import ModelLoadError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub repo id")
    parser.add_argument("--output", required=True, help="the .onnx file to write (its .json goes beside it)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--dynamic_batch", action="store_true", help="symbolic batch axis (default: batch 1)")
    parser.add_argument("--dynamic_size", action="store_true", help="symbolic height and width axes")
    parser.add_argument("--height", type=int, default=None, help="export canvas height (with --width)")
    parser.add_argument("--width", type=int, default=None, help="export canvas width (with --height)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output and its .json")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error("give both --height and --width, or neither")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = export_onnx(args.model, args.output, opset=args.opset, dynamic_batch=args.dynamic_batch,
                           dynamic_size=args.dynamic_size, height=args.height, width=args.width,
                           overwrite=args.overwrite)
    except (ModelLoadError, OnnxExportError, ValueError) as err:
        if debug_requested(argv):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    checks = spec["verification"]["checks"]
    worst = {name: max(c["max_abs_diff"][name] for c in checks) for name in ("logits", "pred_boxes")}
    print(f"wrote {args.output} and {sidecar_path(args.output)}: onnxruntime agrees with PyTorch on "
          f"{len(checks)} checks (max |diff| logits {worst['logits']:.2g}, pred_boxes {worst['pred_boxes']:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
