"""Check a dataset as training would, without training: the per-split report and pictures of sample images.

    python scripts/inspect_data.py --coco_dir /data/coco --output_dir outputs/r50      # a COCO folder, r50 model
    python scripts/inspect_data.py --dataset_path data/saved --box_format xyxy --output_dir outputs/mine
    python scripts/inspect_data.py --yolo_dir data/shapes_yolo --config_overrides num_queries=50 ...
    python scripts/inspect_data.py                                                      # the built-in demo data

Takes train.py's options (the same data source, model and sizes; the rest is ignored) and runs the check every
training run runs before its first step (modeling_detr_custom/data/inspection.py): per split the images, boxes per
class, the most boxes in one image against num_queries, box sizes against the backbone stride, images without boxes,
what the loader fixed or skipped, and the images the run could not resize (skipped). Data a run cannot use (boxes
in another format than declared, class names that differ between splits or from --model_name_or_path, a split
without boxes, an image with more boxes than queries) is one line `error: ...` (exit status 1).

Writes into --output_dir, as a training run does before it trains: data_samples.png (the first --picture_images
training images with their boxes and class names as stored) and training_inputs.png (the same images after the
train transforms, as the model sees them). A wrong box format shows at a glance. The folder stays usable for a run.
"""

from __future__ import annotations

import logging

import datasets

from modeling_detr_custom.checks import make_output_folder, run_cli
from modeling_detr_custom.data import DataReport
from modeling_detr_custom.training import TrainArguments, parse_train_args, resolve_options
from modeling_detr_custom.training.data_check import check_training_data
from modeling_detr_custom.training.factories import load_data


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    """train.py's options (command line over ``--config`` file over defaults), resolved against the preset."""
    return resolve_options(parse_train_args(argv, description=__doc__))


def main(argv: list[str] | None = None) -> DataReport:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("modeling_detr_custom").setLevel(logging.INFO)
    datasets.disable_progress_bars()
    make_output_folder(args.output_dir, "--output_dir")
    data = load_data(args, args.contiguous_labels)
    _, report = check_training_data(args, data, write_pictures=True)  # logs the report and the pictures' paths
    return report


if __name__ == "__main__":
    run_cli(main)
