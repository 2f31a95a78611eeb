"""The data check (`data/inspection.py`) as training, evaluation and `scripts/inspect_data.py` run it: its settings
from the options and the model's config, the report in the log, and the data pictures of a training run.

Training checks the splits it uses (train and eval, cut to ``--max_*_samples``) against the model it will train
(its ``num_queries``, backbone stride, input sizes and, when fine-tuning, the ``--model_name_or_path`` labels)
before any step; evaluation checks its split against the saved model before any prediction.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from datasets import DatasetDict

from ..configuration_detr_custom import DetrCustomConfig
from ..data import (
    CheckSettings,
    DataReport,
    DetectionData,
    DetrCollator,
    check_dataset,
    data_picture,
    scaled_train_transform_kwargs,
    training_inputs_picture,
)
from ..data.pictures import sample_rows
from ..image_processing_detr_custom import DetrCustomImageProcessor
from ..outputs import DATA_PICTURE_FILE, TRAINING_INPUTS_PICTURE_FILE
from .arguments import EvalArguments, TrainArguments
from .factories import (
    apply_config_overrides,
    first_rows,
    make_image_processor,
    make_train_transform,
    model_config_kwargs,
    split_names,
)

logger = logging.getLogger(__name__)


def backbone_stride(config: DetrCustomConfig) -> int:
    """The backbone's output stride: 32 as the original, 16 with dilation (DC5), or ``backbone_output_stride``."""
    return int(config.backbone_output_stride or (16 if config.dilation else 32))


def planned_config(args: TrainArguments) -> DetrCustomConfig:
    """The config the run's model will have (preset or ``--model_name_or_path``, with the overrides), without
    building the model: the data is checked against it before any weight is loaded."""
    if args.model_name_or_path:
        config = DetrCustomConfig.from_pretrained(args.model_name_or_path)
    else:
        config = DetrCustomConfig(**model_config_kwargs(args.model_config))
    apply_config_overrides(config, args.config_overrides)
    return config


def training_resizes(args: TrainArguments) -> tuple[tuple[int, int | None], ...]:
    """Every (short side, long-side limit) a training image goes through: the processor's (``--image_size``,
    ``--max_size``) first, then with augmentation the smallest and largest scales and the crop branch's resizes,
    which have no long-side limit (as in the original DETR)."""
    resizes: list[tuple[int, int | None]] = [(int(args.image_size), int(args.max_size))]
    if args.augmentation:
        sizes = scaled_train_transform_kwargs(args.image_size)
        resizes += [(min(sizes["scales"]), args.max_size), (max(sizes["scales"]), args.max_size),
                    (min(sizes["crop_resize_scales"]), None), (max(sizes["crop_resize_scales"]), None)]
    return tuple(resizes)


def with_rows(data: DetectionData, cuts: dict[str, int | None]) -> DetectionData:
    """``data`` with each split of ``cuts`` cut to its first N rows (None: all)."""
    dataset = dict(data.dataset)
    for split, limit in cuts.items():
        dataset[split] = first_rows(dataset[split], limit)
    return dataclasses.replace(data, dataset=DatasetDict(dataset))


def check_training_data(args: TrainArguments, data: DetectionData, write_pictures: bool = False
                        ) -> tuple[DetectionData, DataReport]:
    """The check of the splits training uses (module docstring), logged; with ``write_pictures`` (the main process,
    ``--picture_images`` > 0) the data pictures go into ``--output_dir``. Returns the data without the images the
    check skipped (the same on every process) and the report. ValueError for data the run cannot use."""
    train_split, eval_split = split_names(args, data)
    cuts = {train_split: args.max_train_samples}
    if eval_split is not None and eval_split != train_split:
        cuts[eval_split] = args.max_eval_samples
    config = planned_config(args)
    settings = CheckSettings(
        num_queries=config.num_queries, stride=backbone_stride(config), resizes=training_resizes(args),
        train_split=train_split, on_bad_data=args.on_bad_data, fine_tuning=True,
        model_labels=config.id2label if args.model_name_or_path else None,
        model_name=f"the model {args.model_name_or_path}")
    data, report = check_dataset(with_rows(data, cuts), list(cuts), settings)
    report.log()
    if write_pictures and args.picture_images > 0:
        save_data_pictures(args, data, train_split)
    return data, report


def save_data_pictures(args: TrainArguments, data: DetectionData, split: str) -> list[Path]:
    """``data_samples.png`` (the first ``--picture_images`` images of ``split`` with their boxes as stored) and
    ``training_inputs.png`` (the same images as the model sees them: train transforms of epoch 0 and the processor)
    in ``--output_dir``; returns their paths."""
    rows = sample_rows(data.dataset[split], args.picture_images)
    id2label = data.label_mapping.id2label
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    collator = DetrCollator(make_image_processor(args), make_train_transform(args), seed=args.seed)
    paths = [folder / DATA_PICTURE_FILE, folder / TRAINING_INPUTS_PICTURE_FILE]
    data_picture(rows, id2label).save(paths[0])
    training_inputs_picture(rows, collator, id2label).save(paths[1])
    logger.info("data pictures: %s", ", ".join(str(p) for p in paths))
    return paths


def check_evaluation_data(args: EvalArguments, data: DetectionData, split: str, config: DetrCustomConfig,
                          processor: DetrCustomImageProcessor) -> DetectionData:
    """The check of the evaluated split (cut to ``--max_eval_samples``) against the saved model (``config``, its
    processor's size), logged; a split without boxes passes only with ``--allow_empty_split``, an image with more
    boxes than queries is a warning. Returns the data without the images the check skipped."""
    size = processor.size or {}
    resizes = ((int(size["shortest_edge"]), size.get("longest_edge")),) if "shortest_edge" in size else ()
    settings = CheckSettings(
        num_queries=config.num_queries, stride=backbone_stride(config), resizes=resizes,
        allow_empty=args.allow_empty_split, on_bad_data=args.on_bad_data, model_labels=config.id2label,
        model_name=f"the model {args.model}")
    data, report = check_dataset(with_rows(data, {split: args.max_eval_samples}), [split], settings)
    report.log()
    return data


__all__ = ["backbone_stride", "check_evaluation_data", "check_training_data", "planned_config", "save_data_pictures",
           "training_resizes"]
