#!/usr/bin/env python
"""Detect objects with a saved detr-custom model and draw them.

    python scripts/predict.py --model outputs/detr-custom images/ photo.jpg --threshold 0.5 --output_dir predictions

Writes <output_dir>/detections.json (every image's detections: label, score, box as absolute
xmin/ymin/xmax/ymax pixels) and <output_dir>/<image stem>.png with the boxes, labels and scores drawn
(<stem>_1.png when that name is taken: an input, or any file an earlier run did not write, is never overwritten).
--model is a local folder (saved by train.py or push_to_hub.py --local_dir) or a Hub repo id; the model is
loaded with trust_remote_code=True. Images are processed in batches of --batch_size, on the GPU when one is
present (--device auto). --dtype bf16 runs the model under bfloat16 autocast (a CPU with native bfloat16,
AVX512-BF16 or AMX, or a GPU with bf16; anything else is refused before any work); boxes and scores are
post-processed in float32 and stay within the tolerance the README states of fp32's (the default).

Nothing is lost: a folder another predict.py run is writing is refused (naming its pid), and a folder holding an
earlier run's detections.json is refused unless --overwrite, which replaces that run's report and drawings only.
Images a run drew (listed in the detections.json beside them) are never read as inputs; their count is printed.

Exit status: 0 when at least one image was processed; each input that cannot be used (not an image, over PIL's
decompression-bomb limit, a size whose resize reaches zero pixels) is reported on one "skipped" line on stderr and
counted at the end, and the others are still processed. 1 when the model cannot be loaded, the device cannot run
--dtype bf16, the output folder is refused or cannot be written (one line naming the path and the OS reason; the
traceback with --debug) or no image could be read, 2 for bad arguments (an unknown --dtype among them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling_detr_custom.checks import debug_requested
from modeling_detr_custom.precision import DTYPES
from modeling_detr_custom.predict import REPORT_FILE, ModelLoadError, predict_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; exits with status 2 (argparse) for a bad one."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub repo id")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring above this (default 0.5)")
    p.add_argument("--output_dir", default="predictions", help="where the JSON and the drawn images go")
    p.add_argument("--batch_size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="the model's precision: fp32 (default) or bf16 autocast (needs native bfloat16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report and drawings of an earlier run in --output_dir (nothing else)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold < 1.0:
        p.error(f"--threshold {args.threshold} must be in [0, 1)")
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr if message.startswith("skipped") else sys.stdout)  # noqa: E731
    try:
        report = predict_images(args.model, args.inputs, threshold=args.threshold, output_dir=args.output_dir,
                                batch_size=args.batch_size, device=args.device, log=log, overwrite=args.overwrite,
                                dtype=args.dtype)
    except (ModelLoadError, ValueError) as err:
        if debug_requested(argv):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = Path(args.output_dir) / REPORT_FILE
    if not report["images"]:
        print(f"error: none of the {len(report['skipped'])} input(s) is a readable image; see {results}",
              file=sys.stderr)
        return 1
    print(f"{len(report['images'])} image(s) processed, {len(report['skipped'])} skipped; detections in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
