"""Training and evaluation helpers for detr-custom, driven by `scripts/train.py` and `scripts/evaluate.py`.

Not remote code: the model, config, loss and image processor files never import this module, so
`save_pretrained` does not ship it.

What lives here, top to bottom:

* presets: the `demo` (CPU-sized, learns the synthetic shapes in minutes), `tiny` (tests) and `r50`
  (the original DETR-R50 recipe) model configs with their training defaults;
* data: the cached synthetic default dataset, the seeded epoch sampler and the collator whose
  augmentation depends only on (seed, epoch, image id), so a run is reproducible across resumes,
  dataloader workers and process counts;
* model, optimizer (AdamW, backbone group at its own lr) and the lr schedule (StepLR in epochs plus
  optional linear warmup) as a pure function of the step, so resuming needs no scheduler state;
* checkpoints written atomically with `accelerator.save_state`, rotation, `latest` resolution;
* COCO evaluation gathered across processes without the duplicates distributed padding adds;
* the training loop itself (`run_training`), with a non-finite-loss stop, a warning when the loss blows up,
  SIGTERM/SIGINT checkpoints, and a refusal to start a new run in a folder that holds a previous one.

Box formats: dataset rows hold absolute COCO ``[x, y, w, h]`` pixels; model targets are normalised
``(cx, cy, w, h)`` relative to each image's UNPADDED size; predictions handed to the metric are
absolute ``(x0, y0, x1, y1)`` pixels of the original image.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from .checks import check_finite_outputs, load_checked, make_output_folder, read_json
from .coco_metric import coco_box_ap, deduplicate_by_image_id, predictions_from_post_processed
from .configuration_detr_custom import DetrCustomConfig
from .curves import plot_training_curves
from .data import (DetectionData, find_split, load_coco_folder_with_info, load_detection_dataset, metric_references,
                   objects_as_columns)
from .image_processing_detr_custom import DetrCustomImageProcessor
from .modeling_detr_custom import DetrCustomForObjectDetection
from .synthetic import make_synthetic_coco
from .transforms import (
    Compose,
    coco_objects_to_target,
    make_train_transforms,
    pil_to_uint8_chw,
    scaled_train_transform_kwargs,
    target_to_coco_annotation,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "all_results.json"
ARGS_FILE = "training_args.json"
PICTURE_FILE = "detections.png"
CURVES_FILE = "training_curves.png"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# ----------------------------------------------------------------------------- presets

# Model configs (DetrCustomConfig kwargs). `demo` was picked by measurement for the best validation AP50 of
# the synthetic shapes in under 10 minutes on a 2-core CPU (README, BENCHMARKS.md). DETR from scratch learns
# slowly; what makes CPU learning visible: a tiny random backbone at stride 8 (a 8x8 feature map of the 64 px
# images), d_model 128 (1.5x faster steps than 256 for a little less learning per step), few queries, Group DETR with 4 groups in training (inference is DETR's), and PyTorch's default
# init of the feed-forward layers: with the original's xavier init this small model stalled (AP50 0.05
# instead of 0.53 after 24 epochs). `r50` is the paper's model, init included.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(backbone="test_resnet", backbone_output_stride=8, freeze_backbone_stem=False, d_model=128,
                 encoder_layers=2, decoder_layers=2, encoder_attention_heads=8, decoder_attention_heads=8,
                 encoder_ffn_dim=512, decoder_ffn_dim=512, num_queries=10, num_query_groups=4, ffn_init="pytorch",
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "tiny": dict(backbone="test_resnet", d_model=32, encoder_layers=1, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, num_queries=12),
    "r50": {},  # DetrCustomConfig's defaults are the original DETR-R50
}

# Training defaults per preset, used for every option left unset on the command line / file.
# `r50` is the original DETR recipe (COCO, 300 epochs, lr x0.1 at 200).
# The small presets take the idle cores (`resolve_num_threads`): a demo step is about 1.5x faster on both
# cores of an idle 2-core machine, but several times slower on two threads when another job keeps a core busy.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(image_size=64, learning_rate=2e-4, backbone_learning_rate=2e-4, num_train_epochs=28,
                 lr_drop_epochs=21, per_device_train_batch_size=8, backbone_weights="none", augmentation=False,
                 num_threads="auto"),
    "tiny": dict(image_size=64, learning_rate=1e-4, backbone_learning_rate=1e-5, num_train_epochs=1,
                 lr_drop_epochs=None, per_device_train_batch_size=2, backbone_weights="none", augmentation=True,
                 num_threads="auto"),
    "r50": dict(image_size=800, learning_rate=1e-4, backbone_learning_rate=1e-5, num_train_epochs=300,
                lr_drop_epochs=200, per_device_train_batch_size=2, backbone_weights="timm", augmentation=True,
                num_threads=0),
}

# The built-in dataset when no dataset argument is given (scripts/make_synthetic_coco.py writes the same).
SYNTHETIC_DEFAULTS: dict[str, Any] = dict(num_train=2048, num_val=128, image_size=64, num_classes=3,
                                          min_shapes=1, max_shapes=3, seed=0)
_SYNTHETIC_VERSION = 1


def default_cache_dir() -> Path:
    """``$DETR_CUSTOM_CACHE`` or ``~/.cache/detr_custom``."""
    return Path(os.environ.get("DETR_CUSTOM_CACHE", Path.home() / ".cache" / "detr_custom"))


def has_dataset_argument(args: Any) -> bool:
    return any(getattr(args, k, None) for k in ("dataset_name", "coco_dir", "dataset_path"))


def resolve_defaults(args: Any) -> Any:
    """Fill every option left at None from the preset and check the values; returns ``args``.

    The preset is ``args.model_config`` if given, else ``demo`` without a dataset argument (the
    synthetic default) and ``r50`` (the original recipe) with one.
    """
    if args.model_config is None:
        args.model_config = "r50" if has_dataset_argument(args) else "demo"
    args.image_size_given = args.image_size is not None
    preset = args.model_config if args.model_config in TRAINING_PRESETS else "r50"
    for key, value in TRAINING_PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = args.per_device_train_batch_size
    validate_args(args)
    return args


def validate_args(args: Any) -> None:
    """Raise ValueError naming the first bad option value."""
    sources = [k for k in ("dataset_name", "coco_dir", "dataset_path") if getattr(args, k, None)]
    if len(sources) > 1:
        raise ValueError(f"give at most one of --dataset_name, --coco_dir, --dataset_path; got {sources}")
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "image_size",
                "gradient_accumulation_steps", "eval_every_epochs", "logging_steps")
    for key in positive:
        if int(getattr(args, key)) < 1:
            raise ValueError(f"--{key} must be >= 1; got {getattr(args, key)!r}")
    if args.image_size < 32:
        raise ValueError(f"--image_size must be >= 32 pixels (the backbone has stride 32); got {args.image_size}")
    for key in ("learning_rate",):
        if not getattr(args, key) > 0:
            raise ValueError(f"--{key} must be > 0; got {getattr(args, key)!r}")
    if args.num_threads != "auto" and not (isinstance(args.num_threads, int) and args.num_threads >= 0):
        raise ValueError(f"--num_threads must be 'auto' or an integer >= 0; got {args.num_threads!r}")
    for key in ("backbone_learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "checkpointing_steps",
                "checkpointing_epochs", "dataloader_num_workers"):
        if getattr(args, key) < 0:
            raise ValueError(f"--{key} must be >= 0; got {getattr(args, key)!r}")
    if args.lr_drop_epochs is not None and args.lr_drop_epochs < 0:
        raise ValueError(f"--lr_drop_epochs must be >= 1, or 0 for no drop; got {args.lr_drop_epochs}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1; got {args.checkpoints_total_limit}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1 (it overrides --num_train_epochs); got {args.max_steps}")
    if args.model_config not in MODEL_PRESETS and not Path(args.model_config).exists():
        raise ValueError(f"--model_config {args.model_config!r} is neither a preset {sorted(MODEL_PRESETS)} "
                         "nor a config.json file / model folder")
    weights = str(args.backbone_weights)
    if weights not in ("timm", "none") and not Path(weights).is_file():
        raise ValueError(f"--backbone_weights must be 'timm', 'none' or a weights file; {weights!r} is not a file")


# ----------------------------------------------------------------------------- data


def synthetic_coco_dir(cache_dir: str | os.PathLike | None, spec: Mapping[str, Any] | None = None) -> Path:
    """Generate the synthetic shapes COCO folder once and return it (cached by its parameters).

    Written to a temporary folder and renamed, so an interrupted generation is never reused.
    Call under ``accelerator.main_process_first()`` with several processes.
    """
    spec = {**SYNTHETIC_DEFAULTS, **(spec or {})}
    name = "v{}-train{num_train}-val{num_val}-px{image_size}-cls{num_classes}-shapes{min_shapes}to{max_shapes}-seed{seed}"
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / "synthetic_coco" / name.format(_SYNTHETIC_VERSION, **spec)
    if (out / "annotations" / "instances_val.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generating the synthetic shapes dataset in %s", out)
    make_synthetic_coco(tmp, **spec)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_data(args: Any) -> DetectionData:
    """The dataset of the arguments: a Hub name, a COCO folder, a saved dataset, or the synthetic default."""
    datasets_cache = str(Path(args.cache_dir) / "datasets") if args.cache_dir else None
    on_bad = getattr(args, "on_bad_data", "skip")
    if args.dataset_name or args.dataset_path:
        return load_detection_dataset(dataset_name=args.dataset_name, dataset_path=args.dataset_path,
                                      contiguous_labels=args.contiguous_labels, on_bad_data=on_bad,
                                      cache_dir=datasets_cache)
    coco_dir = args.coco_dir
    if not coco_dir:
        spec = {k: getattr(args, f"synthetic_{k}") for k in SYNTHETIC_DEFAULTS if getattr(args, f"synthetic_{k}", None) is not None}
        coco_dir = synthetic_coco_dir(args.cache_dir, spec)
    return load_coco_folder_with_info(coco_dir, contiguous_labels=args.contiguous_labels, on_bad_data=on_bad,
                                      full_decode_check=getattr(args, "full_decode_check", False),
                                      cache_dir=datasets_cache)


def without_image_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    """Rows yield ``{"path", "bytes"}`` for the image: the collator decodes (and survives bad files)."""
    return dataset.cast_column("image", datasets.Image(decode=False))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (no collisions like seed + epoch would give)."""
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    No hidden generator state: resuming at epoch e, batch b only needs e and b (then
    `accelerator.skip_first_batches`). Deliberately has no ``generator`` attribute, so accelerate
    does not try to synchronise one across processes: every process computes the same order and
    accelerate's batch sharding gives each its own batches.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class DetrCollator:
    """Dataset rows (schema of `modeling_detr_custom.data`, image not decoded) -> a DETR batch.

    Per row: decode to uint8 (3, H, W) without EXIF rotation (COCO boxes are in raw pixels);
    ``objects`` (absolute COCO xywh) -> absolute xyxy target (crowd and empty boxes dropped);
    the augmentation with a generator seeded by ``(seed, epoch, image_id)``; then one processor
    call for the batch, which pads and normalises the boxes to cxcywh by each UNPADDED size.

    An image that cannot be decoded (a truncated file the up-front check missed) becomes a grey
    image of its recorded size with no objects, with a warning: a crash in the middle of an
    epoch, or a process skipping a step that the others take, would be worse.

    Returns the processor's `BatchFeature`: ``pixel_values`` (B, 3, H, W) float32,
    ``pixel_mask`` (B, H, W) int64 (1 = real pixel), ``labels`` (B dicts: ``class_labels`` (n,),
    ``boxes`` (n, 4) normalised cxcywh, ``orig_size``/``size`` (2,) (h, w), ``image_id`` (1,)).
    """

    def __init__(self, image_processor: DetrCustomImageProcessor, transforms: Compose | None = None,
                 seed: int = 0, drop_crowd: bool = True) -> None:
        self.image_processor, self.transforms, self.seed, self.drop_crowd = image_processor, transforms, seed, drop_crowd
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before creating the epoch's iterator: worker processes get a copy at that moment."""
        self.epoch = int(epoch)

    @staticmethod
    def decode(row: Mapping[str, Any]) -> tuple[Tensor, Mapping[str, Any]]:
        """(uint8 (3, H, W) image, objects); unreadable images -> grey image, no objects."""
        try:
            return pil_to_uint8_chw(row["image"]), row["objects"]
        except Exception as err:  # noqa: BLE001 - any decode failure is handled the same way
            height, width = int(row.get("height") or 64), int(row.get("width") or 64)
            logger.warning("image %s cannot be decoded (%s); using an empty %dx%d image with no objects "
                           "(--full_decode_check finds such files before training)", row.get("image_id"), err, height, width)
            return torch.full((3, height, width), 114, dtype=torch.uint8), {"bbox": [], "category": []}

    def prepare(self, row: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """One row -> (uint8 (3, H, W) image, the processor's COCO annotation dict)."""
        image, objects = self.decode(row)
        target = coco_objects_to_target(objects, image.shape[-2], image.shape[-1], self.drop_crowd)
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, int(row["image_id"])))
            image, target = self.transforms(image, target, generator)
        return image, target_to_coco_annotation(int(row["image_id"]), target)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        images, annotations = zip(*(self.prepare(row) for row in rows))
        return self.image_processor(images=list(images), annotations=list(annotations),
                                    do_resize=self.transforms is None, return_tensors="pt")


def make_image_processor(args: Any, source: str | None = None) -> DetrCustomImageProcessor:
    """The processor saved with the model: short side ``args.image_size``, long side ``args.max_size``
    (default DETR's 1333/800 ratio). ``source``: a model folder whose processor settings to reuse."""
    size = {"shortest_edge": int(args.image_size), "longest_edge": int(max_size_for(args))}
    if source and (Path(source) / "preprocessor_config.json").is_file():
        processor = DetrCustomImageProcessor.from_pretrained(source)
        if getattr(args, "image_size_given", True) or "shortest_edge" not in processor.size:
            processor.size = size
        else:  # keep the model's own size, and augment around it
            args.image_size = processor.size["shortest_edge"]
            args.max_size = processor.size.get("longest_edge") or max_size_for(args)
        return processor
    return DetrCustomImageProcessor(size=size)


def max_size_for(args: Any) -> int:
    """Long-side limit: ``--max_size`` or DETR's 1333 scaled like the short side (800)."""
    return int(args.max_size) if getattr(args, "max_size", None) else round(1333 * args.image_size / 800)


def make_train_transform(args: Any) -> Compose | None:
    """DETR's augmentation with every size scaled to ``--image_size``; None with ``--no_augmentation``
    (the processor then only resizes)."""
    if not args.augmentation:
        return None
    kwargs = scaled_train_transform_kwargs(args.image_size)
    kwargs["max_size"] = max_size_for(args)
    return make_train_transforms(**kwargs)


def make_dataloaders(args: Any, data: DetectionData, processor: DetrCustomImageProcessor
                     ) -> tuple[DataLoader, DataLoader | None, datasets.Dataset | None, str | None]:
    """(train loader, eval loader, eval dataset, eval split name), the last three None without an eval
    split; loaders not yet prepared by accelerate. Datasets yield undecoded images.

    Training batches drop the last incomplete batch, as the original DETR does.
    """
    train_split = args.train_split or find_split(data.dataset, "train")
    eval_split = args.eval_split
    if eval_split is None:
        try:
            eval_split = find_split(data.dataset, "eval")
        except ValueError:
            logger.warning("no validation split in %s: training without evaluation", list(data.dataset))
    for split in (train_split, eval_split):
        if split is not None and split not in data.dataset:
            raise ValueError(f"split {split!r} not in the dataset; splits: {list(data.dataset)}")
    train_ds = without_image_decoding(data.dataset[train_split])
    if args.max_train_samples:
        train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))
    if len(train_ds) < args.per_device_train_batch_size:
        raise ValueError(f"the {train_split!r} split has {len(train_ds)} images, fewer than "
                         f"--per_device_train_batch_size {args.per_device_train_batch_size}")
    train_loader = DataLoader(
        train_ds, batch_size=args.per_device_train_batch_size, drop_last=True,
        sampler=EpochShuffleSampler(len(train_ds), args.seed),
        collate_fn=DetrCollator(processor, make_train_transform(args), seed=args.seed),
        num_workers=args.dataloader_num_workers,
        # its own generator: creating an iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(args.seed))
    eval_loader = eval_ds = None
    if eval_split is not None:
        eval_ds = without_image_decoding(data.dataset[eval_split])
        if args.max_eval_samples:
            eval_ds = eval_ds.select(range(min(args.max_eval_samples, len(eval_ds))))
        eval_loader = make_eval_dataloader(eval_ds, processor, args.per_device_eval_batch_size,
                                           args.dataloader_num_workers)
    return train_loader, eval_loader, eval_ds, eval_split


def make_eval_dataloader(dataset: datasets.Dataset, processor: DetrCustomImageProcessor, batch_size: int,
                         num_workers: int = 0) -> DataLoader:
    """Sequential loader of undecoded rows; the processor resizes to its ``size``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=DetrCollator(processor),
                      num_workers=num_workers, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- model


def model_config_kwargs(name_or_path: str) -> dict[str, Any]:
    """Preset kwargs, or those of a config.json file / model folder."""
    if name_or_path in MODEL_PRESETS:
        return dict(MODEL_PRESETS[name_or_path])
    config = DetrCustomConfig.from_pretrained(name_or_path)
    return {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "auto_map", "model_type",
                                                                   "transformers_version", "architectures")}


def apply_config_overrides(config: DetrCustomConfig, overrides: str | None) -> None:
    """``"d_model=64,num_queries=20"`` (transformers example-script style), typed like the existing value."""
    if not overrides:
        return
    try:
        config.update_from_string(overrides)
    except ValueError as err:
        raise ValueError(f"--config_overrides {overrides!r}: {err} (expected 'key=value,key=value' with "
                         "DetrCustomConfig field names, e.g. 'd_model=64,num_queries=20')") from err
    config.validate_detr()


def label_info(data: DetectionData) -> tuple[dict[int, str], dict[int, int]]:
    """(id2label for the model, model label -> dataset category id for evaluation)."""
    return data.label_mapping.id2label, dict(data.label_mapping.label_to_category_id)


def create_model(args: Any, id2label: Mapping[int, str], label_to_category_id: Mapping[int, int]
                 ) -> DetrCustomForObjectDetection:
    """A fresh model (preset + overrides, ImageNet backbone per ``--backbone_weights``) or
    ``--model_name_or_path`` with the dataset's label set (class head replaced if it differs).

    Records ``label_to_category_id`` and ``contiguous_labels`` in the config for evaluation.
    """
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if args.model_name_or_path:
        model = load_for_finetuning(args.model_name_or_path, id2label, args.config_overrides)
    else:
        config = DetrCustomConfig(**model_config_kwargs(args.model_config), id2label=id2label)
        apply_config_overrides(config, args.config_overrides)
        model = DetrCustomForObjectDetection(config)
        if args.backbone_weights != "none":
            # "timm" downloads the ImageNet weights of config.backbone; a path loads a local file
            model.load_pretrained_backbone(None if args.backbone_weights == "timm" else args.backbone_weights)
        else:
            revive_zero_init_batch_norms(model)
    model.config.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
    model.config.contiguous_labels = bool(args.contiguous_labels)
    return model


def revive_zero_init_batch_norms(model: torch.nn.Module) -> int:
    """Set to 1 the frozen BatchNorm scales that a random timm ResNet starts at 0; returns how many.

    timm zero-initialises the last BatchNorm of every residual block (``zero_init_last``) so that
    each block starts as the identity and the BatchNorm learns its scale. DETR freezes BatchNorm,
    so a random backbone would keep those scales at 0 forever: every residual branch dead, the
    backbone reduced to its stem and shortcut convolutions, unable to learn shapes. Pretrained
    weights overwrite these buffers, so only ``--backbone_weights none`` needs this.
    """
    revived = 0
    for name, buffer in model.named_buffers():
        if ".backbone." in f".{name}" and name.endswith(".weight") and buffer.numel() and not buffer.any():
            buffer.fill_(1.0)
            revived += 1
    if revived:
        logger.info("random backbone: %d zero-initialised frozen BatchNorm scales set to 1 (live residual branches)", revived)
    return revived


def load_for_finetuning(path: str, id2label: dict[int, str], overrides: str | None) -> DetrCustomForObjectDetection:
    """Load a saved/converted model for a new label set.

    With another number of labels the mismatched class head is re-initialised by
    ``ignore_mismatched_sizes``; with the same number but other names it is re-initialised here,
    since keeping it would silently map old classes onto new ones.
    """
    config = DetrCustomConfig.from_pretrained(path)
    old = {int(k): v for k, v in config.id2label.items()}
    config.id2label = id2label
    config.label2id = {v: k for k, v in id2label.items()}
    apply_config_overrides(config, overrides)
    # missing keys are allowed (new layers from --config_overrides start from scratch, logged); corrupt or
    # non-finite weights are not
    model = load_checked(DetrCustomForObjectDetection, path, allow_missing=True, config=config,
                         ignore_mismatched_sizes=True)
    if old != id2label:
        if len(old) == len(id2label):
            model.class_labels_classifier.reset_parameters()
        logger.info("new label set (%d labels, was %d): the class head starts from scratch", len(id2label), len(old))
    return model


def param_groups(model: torch.nn.Module, learning_rate: float, backbone_learning_rate: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: the transformer and heads at ``learning_rate``, the backbone at its own lr.

    As the original, weight decay applies to every parameter, and a backbone lr of 0 freezes the
    backbone. Parameters already frozen (stem, layer1) are left out.
    """
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_backbone = ".backbone." in f".{name}"
        if is_backbone and backbone_learning_rate == 0:
            param.requires_grad_(False)
            continue
        (backbone if is_backbone else rest).append(param)
    groups = [{"params": rest, "lr": learning_rate, "initial_lr": learning_rate, "weight_decay": weight_decay, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": backbone_learning_rate, "initial_lr": backbone_learning_rate,
                       "weight_decay": weight_decay, "name": "backbone"})
    return groups


def make_optimizer(model: torch.nn.Module, args: Any) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel where torch has one (3x faster steps on CPU for
    the demo model, whose small inputs make the optimizer a large share of a step)."""
    groups = param_groups(model, args.learning_rate, args.backbone_learning_rate, args.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)


def lr_factor(global_step: int, epoch: int, lr_drop_epochs: int | None, warmup_steps: int, gamma: float = 0.1) -> float:
    """Multiplier of the base lrs for the optimizer step after ``global_step`` steps, in ``epoch``.

    StepLR in epochs (x ``gamma`` every ``lr_drop_epochs`` epochs, as the original's per-epoch
    scheduler) times a linear warmup over the first ``warmup_steps`` steps.
    """
    factor = gamma ** (epoch // lr_drop_epochs) if lr_drop_epochs else 1.0
    if warmup_steps and global_step < warmup_steps:
        factor *= (global_step + 1) / warmup_steps
    return factor


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Where training stands; saved as JSON beside every checkpoint.

    Attributes:
        global_step: optimizer steps done.
        epoch: the current epoch (0-based); equals the number of finished epochs at epoch ends.
        batches_in_epoch: batches of ``epoch`` this process has consumed (skipped on resume).
        num_processes, total_batch_size: of the run that wrote it (an exact resume needs the same).
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    num_processes: int = 1
    total_batch_size: int = 0

    def save(self, folder: Path) -> None:
        (folder / TRAINING_STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        return cls(**read_json(folder / TRAINING_STATE_FILE))


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with their training state) under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / TRAINING_STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``latest`` -> the newest complete checkpoint of ``output_dir`` (None if there is none yet);
    a folder -> itself, checked."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting from scratch", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint folder "
                         f"(no {TRAINING_STATE_FILE}); use 'latest' or a {CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}N folder")
    return path


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, total_limit: int | None,
                    saved: Path | None = None) -> Path:
    """`accelerator.save_state` into ``checkpoints/checkpoint-<step>``, atomically.

    Everything is written to a temporary folder that is renamed once complete, so a crash or a
    kill during saving never leaves a checkpoint that `latest` would pick. Then only the newest
    ``total_limit`` checkpoints are kept. Every process must call this.

    ``saved``: the checkpoint this run last wrote or resumed from. When it is this step's folder there is
    nothing to write (a step and an epoch checkpoint coincide); any other folder of that name is stale (left
    by the trajectory before a resume from an earlier step) and is replaced, never reused.
    """
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step}"
    if saved is not None and saved.resolve() == final.resolve():
        return final
    if (final / TRAINING_STATE_FILE).is_file() and accelerator.is_main_process:
        logger.warning("replacing %s, written before this run resumed from an earlier step", final)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def save_job_checkpoint(job: Job) -> None:
    """`save_checkpoint` of the job's current state (once per step); it becomes ``job.last_checkpoint``."""
    job.last_checkpoint = save_checkpoint(job.accelerator, job.output_dir, job.state, job.args.checkpoints_total_limit,
                                          job.last_checkpoint)


def rotate_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``total_limit``."""
    if not total_limit:
        return
    for old in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- evaluation


def labels_to_device_free(labels: list[dict]) -> list[dict]:
    """Targets moved to the CPU (post-processing sizes and image ids)."""
    return [{k: v.cpu() for k, v in t.items()} for t in labels]


@torch.no_grad()
def predict(model: torch.nn.Module, dataloader: Iterable, processor: DetrCustomImageProcessor,
            accelerator: Any | None = None) -> list[dict]:
    """Predictions of this process, one dict per image: ``image_id``, ``boxes`` absolute xyxy pixels of
    the ORIGINAL image, ``scores``, ``labels`` (model ids); all queries kept, as the original evaluates."""
    model.eval()
    predictions = []
    for batch in dataloader:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        # NaN scores would fall below any threshold: AP 0 for a broken model instead of an error
        check_finite_outputs(outputs.logits, outputs.pred_boxes, "evaluation")
        targets = labels_to_device_free(batch["labels"])
        sizes = torch.stack([t["orig_size"] for t in targets])
        # threshold -1 keeps every query: softmax scores are >= 0
        results = processor.post_process_object_detection(outputs, threshold=-1.0, target_sizes=sizes)
        results = [{k: v.float().cpu() for k, v in r.items()} for r in results]
        predictions += predictions_from_post_processed(results, [t["image_id"] for t in targets])
    return predictions


def gather_predictions(predictions: list[dict], accelerator: Any) -> list[dict]:
    """All processes' predictions, each image once: the duplicates that accelerate's even batches add
    at the end of a sharded eval set are removed by image id."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        predictions = gather_object(predictions)
    return deduplicate_by_image_id(predictions)


def evaluate_coco(model: torch.nn.Module, dataloader: Iterable, processor: DetrCustomImageProcessor,
                  accelerator: Any, references: list[dict], label_to_category_id: Mapping[int, int] | None
                  ) -> dict[str, float]:
    """COCO box AP (pycocotools) of ``model`` on ``dataloader``; the same dict on every process.

    ``references``: per-image GT (`data.metric_references`), category ids of the dataset;
    predicted labels are mapped to them with ``label_to_category_id``.
    """
    predictions = gather_predictions(predict(model, dataloader, processor, accelerator), accelerator)
    result: list[Any] = [None]
    if accelerator.is_main_process:
        result[0] = coco_box_ap(predictions, references, label_to_category_id=label_to_category_id)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(result)
    return result[0]


# ----------------------------------------------------------------------------- picture


LEGEND_HEIGHT = 18  # pixels under the tiles for draw_legend


def draw_detections(images: Sequence[Image.Image], detections: Sequence[Mapping[str, Any]],
                    id2label: Mapping[int, str], path: str | os.PathLike,
                    ground_truth: Sequence[Sequence[Sequence[float]]] | None = None, min_side: int = 256) -> Path:
    """Save the images side by side with their detections (red, ``label score``), optional ground
    truth (green) and a legend below them. ``detections[i]``: ``boxes`` (n, 4) absolute xyxy pixels of
    image i, ``scores``, ``labels``; ``ground_truth[i]``: absolute COCO xywh boxes."""
    tiles = []
    for i, (image, det) in enumerate(zip(images, detections)):
        scale = max(1.0, min_side / min(image.size))
        tile = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for x, y, w, h in (ground_truth[i] if ground_truth else []):
            draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(0, 200, 0), width=1)
        for box, score, label in zip(_tolist(det["boxes"]), _tolist(det["scores"]), _tolist(det["labels"])):
            x0, y0, x1, y1 = (v * scale for v in box)
            draw.rectangle([x0, y0, x1, y1], outline=(255, 0, 0), width=2)
            text = f"{id2label.get(int(label), label)} {score:.2f}"
            draw.rectangle([x0, max(0, y0 - 11), x0 + 6 * len(text), max(0, y0 - 11) + 11], fill=(255, 0, 0))
            draw.text((x0 + 1, max(0, y0 - 11)), text, fill=(255, 255, 255))
        tiles.append(tile)
    height = max(t.height for t in tiles)
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), height + LEGEND_HEIGHT), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 4
    draw_legend(ImageDraw.Draw(canvas), height, with_truth=bool(ground_truth))
    canvas.save(path)
    return Path(path)


def draw_legend(draw: ImageDraw.ImageDraw, top: int, with_truth: bool) -> None:
    """A key under the tiles: which colour is the ground truth and which the predictions."""
    entries = ([((0, 200, 0), "ground truth")] if with_truth else []) + [((255, 0, 0), "prediction (label score)")]
    x = 4
    for colour, text in entries:
        draw.rectangle([x, top + 4, x + 14, top + 14], outline=colour, width=2)
        draw.text((x + 20, top + 4), text, fill=(0, 0, 0))
        x += 20 + 6 * len(text) + 16


def _tolist(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


@torch.no_grad()
def save_detection_picture(model: DetrCustomForObjectDetection, processor: DetrCustomImageProcessor,
                           dataset: datasets.Dataset, path: Path, num_images: int = 4, threshold: float = 0.5) -> Path:
    """Detections (score > ``threshold``) of ``model`` on the first ``num_images`` rows of ``dataset``."""
    # the collator's decoding: an unreadable file must not crash the run after training
    decoded = [DetrCollator.decode(dataset[i]) for i in range(min(num_images, len(dataset)))]
    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image, _ in decoded]
    model.eval()
    inputs = processor(images=images, return_tensors="pt", device=model.device)
    outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    sizes = torch.tensor([[im.height, im.width] for im in images])
    detections = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
    truth = [objects_as_columns(objects)["bbox"] for _, objects in decoded]
    return draw_detections(images, detections, {int(k): v for k, v in model.config.id2label.items()}, path, truth)


# ----------------------------------------------------------------------------- logging, signals


class MetricsLogger:
    """Metrics to accelerate's trackers and, on the main process, to ``metrics.jsonl`` (appended,
    so a resumed run continues the same file)."""

    def __init__(self, accelerator: Any, output_dir: Path) -> None:
        self.accelerator, self.path = accelerator, output_dir / METRICS_FILE

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(numeric, step=step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits.

    A second signal restores the default behaviour (a second Ctrl-C kills at once).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("received %s: writing a checkpoint at the end of this step, then exiting",
                       signal.Signals(signum).name)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stopped without saving that state."""


# ----------------------------------------------------------------------------- the job


@dataclass
class Job:
    """Everything the loop needs, built once by `setup`."""

    args: Any
    accelerator: Any
    model: Any
    optimizer: Any
    train_loader: Any
    eval_loader: Any
    processor: DetrCustomImageProcessor
    data: DetectionData
    eval_split: str | None
    references: list[dict] | None
    label_to_category_id: dict[int, int]
    output_dir: Path
    steps_per_epoch: int
    max_steps: int
    num_epochs: int
    state: TrainState = field(default_factory=TrainState)
    metrics: MetricsLogger | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int = -1
    last_checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)  # wall clock of this process's run, for the log
    first_loss: float | None = None  # the first step's loss, the scale of check_loss_scale
    loss_blowup_warned: bool = False


def make_accelerator(args: Any) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    return Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to, project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")),
        # our sampler is seeded by (seed, epoch) already; accelerate must not replace it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        # the only buffers are frozen BatchNorm statistics and loss weights: nothing to re-broadcast each step
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=args.cpu)


def setup(args: Any) -> Job:
    """Accelerator, data, model, optimizer, loaders (prepared), resume. Every process calls it."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(resolve_num_threads(args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        logger.info("torch CPU threads per process: %d (--num_threads %s)", torch.get_num_threads(), args.num_threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # seed + rank, like the original (DDP then broadcasts rank 0's initial weights to all)
    set_seed(args.seed, device_specific=True)
    with accelerator.main_process_first():  # builds the synthetic data and the datasets cache once
        data = load_data(args)
    for split, report in data.report.items():
        logger.info("data %s: %s", split, {k: v for k, v in report.items() if v})
    id2label, label_to_category_id = label_info(data)
    model = create_model(args, id2label, label_to_category_id)
    processor = make_image_processor(args, args.model_name_or_path)
    train_loader, eval_loader, eval_ds, eval_split = make_dataloaders(args, data, processor)
    optimizer = make_optimizer(model, args)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError(f"no full training batch: {len(train_loader.dataset)} images for a total batch of "
                         f"{args.per_device_train_batch_size * accelerator.num_processes}")
    max_steps = args.max_steps or args.num_train_epochs * steps_per_epoch
    # ground truth with dataset category ids; predictions are mapped to them with the same mapping
    references = metric_references(eval_ds, label_to_category_id) if eval_ds is not None else None
    job = Job(args, accelerator, model, optimizer, train_loader, eval_loader, processor, data, eval_split, references,
              label_to_category_id, output_dir, steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch))
    job.state.num_processes = accelerator.num_processes
    job.state.total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    job.metrics = MetricsLogger(accelerator, output_dir)
    resume(job)
    return job


def resolve_num_threads(setting: int | str, local_processes: int = 1) -> int:
    """Torch CPU threads for each of this machine's ``local_processes`` training processes.

    An integer is used as given (0: torch's default, every core). ``"auto"`` (the small presets) takes
    the cores idle right now (0.3 s of CPU usage) shared among the processes, at least 1 and at most 4:
    a demo step runs about 1.5x faster on both cores of an idle 2-core machine than on one, but several
    times slower when another job keeps one of them busy (BENCHMARKS.md).
    """
    if setting != "auto":
        return int(setting) or torch.get_num_threads()
    import psutil  # accelerate's dependency

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores * (1 - psutil.cpu_percent(interval=0.3) / 100)
    return max(1, min(4, round(idle) // max(1, local_processes)))


def configure_logging(accelerator: Any) -> None:
    """Our messages at INFO on the main process, warnings only elsewhere; libraries quiet.

    A root handler is added only when there is none (a script), so callers' logging (pytest,
    notebooks) keeps working.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.getLogger("modeling_detr_custom").setLevel(level)
    for name in ("datasets", "transformers", "accelerate", "timm", "PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.disable_progress_bars()


def resume(job: Job) -> None:
    """Load ``--resume_from_checkpoint`` (model, optimizer, RNG states, accelerate's step) and the state."""
    path = resolve_checkpoint(job.args.resume_from_checkpoint, job.output_dir)
    if path is None:
        return
    load_checkpoint_state(job, path)
    check_rng_state(path, job.accelerator.process_index)
    saved = TrainState.load(path)
    if (saved.num_processes, saved.total_batch_size) != (job.state.num_processes, job.state.total_batch_size):
        logger.warning("resuming a run of %d process(es), total batch %d, with %d, %d: the data order and "
                       "the steps differ from an uninterrupted run", saved.num_processes, saved.total_batch_size,
                       job.state.num_processes, job.state.total_batch_size)
    job.state.global_step, job.state.epoch, job.state.batches_in_epoch = saved.global_step, saved.epoch, saved.batches_in_epoch
    if job.state.batches_in_epoch >= len(job.train_loader):  # saved at an epoch end
        job.state.epoch, job.state.batches_in_epoch = job.state.epoch + 1, 0
    job.last_checkpoint = path
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, job.state.global_step, job.state.epoch,
                job.state.batches_in_epoch)


# Optimizer settings that come from this run's options; `load_state` would bring back the checkpoint's.
OPTIMIZER_OPTIONS = {"initial_lr": "learning rate", "weight_decay": "weight decay"}


def load_checkpoint_state(job: Job, path: Path) -> None:
    """`accelerator.load_state` of ``path``, then this run's learning rates and weight decay (each change logged),
    so that what training_args.json records is what is used. A checkpoint that does not load is one ValueError line."""
    wanted = [{key: group[key] for key in OPTIMIZER_OPTIONS} for group in job.optimizer.param_groups]
    try:
        job.accelerator.load_state(str(path))
    except (RuntimeError, ValueError, OSError, SafetensorError) as err:
        raise ValueError(f"--resume_from_checkpoint {path}: {checkpoint_problem(err)}") from None
    for group, settings in zip(job.optimizer.param_groups, wanted):
        for key, value in settings.items():
            if group[key] != value and job.accelerator.is_main_process:
                logger.warning("resuming with the %s of group %s changed: %g in the checkpoint, %g from now on",
                               OPTIMIZER_OPTIONS[key], group.get("name", "?"), group[key], value)
            group[key] = value


def checkpoint_problem(err: Exception) -> str:
    """What is wrong with a checkpoint, in one line; torch's own message lists every mismatched tensor."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    mismatch = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                    lines[0] if "parameter group" in lines[0] else None)
    if mismatch is None:
        return f"it cannot be loaded ({lines[0][:300]})"
    return (f"it does not fit this model and optimizer ({mismatch[:300]}); resume with the options of the run that "
            "wrote it (--model_config, --config_overrides, --backbone_learning_rate: see its training_args.json)")


def check_rng_state(path: Path, process_index: int) -> None:
    """Warn when this process's RNG state in ``path`` cannot be read: `load_state` then keeps the current RNG and
    says so only at INFO (hidden), and dropout draws differ from an uninterrupted run."""
    from accelerate.utils import RNG_STATE_NAME, load

    file = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        states = load(file)
        problem = None if {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states) else "keys missing"
    except Exception as err:  # noqa: BLE001 - whatever stops accelerate from reading it makes the resume inexact
        problem = f"{type(err).__name__}: {err}"
    if problem:
        logger.warning("the resume from %s is NOT exact: %s cannot be read (%s); the weights, optimizer, step and "
                       "data order are restored, but random draws (dropout) differ from an uninterrupted run",
                       path, file, problem)


def epoch_loader(job: Job, epoch: int) -> Any:
    """The training loader of ``epoch``, its first batches skipped when resuming inside it."""
    loader = job.train_loader
    loader.set_epoch(epoch)  # sampler order = f(seed, epoch)
    loader.collate_fn.set_epoch(epoch) if hasattr(loader.collate_fn, "set_epoch") else None
    skip = job.state.batches_in_epoch if epoch == job.state.epoch else 0
    if skip:
        loader = job.accelerator.skip_first_batches(loader, skip)
        loader.set_epoch(epoch)
    return loader


class _Running:
    """Sums of the logged quantities since the last log line (this process)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, float] = {}
        self.steps, self.samples, self.start = 0, 0, time.perf_counter()

    def add(self, loss_dict: Mapping[str, Tensor], samples: int) -> None:
        for key, value in loss_dict.items():
            self.terms[key] = self.terms.get(key, 0.0) + float(value.detach())
        self.steps, self.samples = self.steps + 1, self.samples + samples


def train_step(job: Job, batch: Mapping[str, Any], stop: StopRequest) -> tuple[float, bool, dict[str, Tensor]]:
    """Forward, one collective for (loss, stop flag), non-finite check, backward, clip, step.

    Returns (loss averaged over processes, stop requested on any process, local loss terms).
    """
    acc, model = job.accelerator, job.model
    with acc.accumulate(model):
        model.train()
        loss, loss_dict = forward_loss(job, batch)
        flags = torch.stack([loss.detach().float(), torch.tensor(float(stop.signum is not None), device=loss.device)])
        flags = acc.reduce(flags.clone(), reduction="sum")
        mean_loss = float(flags[0]) / acc.num_processes
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(non_finite_message(job, mean_loss, loss_dict))
        check_loss_scale(job, mean_loss)
        acc.backward(loss)
        if acc.sync_gradients:
            if job.args.dump_first_step and job.state.global_step == 0:
                dump_first_step(job, batch, mean_loss, loss_dict)
            if job.args.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), job.args.max_grad_norm)
            set_learning_rates(job.optimizer, lr_factor(job.state.global_step, job.state.epoch, job.args.lr_drop_epochs,
                                                        job.args.warmup_steps))
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
    return mean_loss, float(flags[1]) > 0, loss_dict


# What loss_detr_custom's Hungarian matcher raises (a ValueError, inside the forward, before any loss exists)
# when the predictions are NaN or Inf: the same divergence as a non-finite loss.
MATCHER_NON_FINITE = "the matching cost is not finite"


def forward_loss(job: Job, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, loss terms) of the training forward. Predictions the matcher refuses as non-finite give a
    NaN loss and no terms, so that this process still joins train_step's collective and every process stops
    on the non-finite-loss path together."""
    try:
        outputs = job.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
    except ValueError as err:
        if MATCHER_NON_FINITE not in str(err):
            raise
        return torch.tensor(float("nan"), device=job.accelerator.device), {}
    return outputs.loss, outputs.loss_dict


LOSS_BLOWUP_FACTOR = 100.0


def check_loss_scale(job: Job, loss: float) -> None:
    """Warn (once) when the loss exceeds LOSS_BLOWUP_FACTOR x the first step's: finite, but diverging.

    ``loss`` is the host value train_step already read for its non-finite check: no extra device sync.
    """
    if job.first_loss is None:
        job.first_loss = loss
        return
    if job.loss_blowup_warned or not loss > LOSS_BLOWUP_FACTOR * job.first_loss > 0:
        return
    job.loss_blowup_warned = True
    message = (f"loss {loss:.4g} at step {job.state.global_step + 1} is over {LOSS_BLOWUP_FACTOR:g}x the first step's "
               f"loss ({job.first_loss:.4g}): training is diverging; the last good checkpoint is "
               f"{job.last_checkpoint or 'none yet'}. Try a lower --learning_rate or --max_grad_norm 0.1")
    if job.accelerator.is_main_process:
        logger.warning("%s", message)
    job.metrics.log({"event": "loss_blowup", "message": message}, job.state.global_step + 1)


def non_finite_message(job: Job, loss: float, loss_dict: Mapping[str, Tensor]) -> str:
    terms = ({k: round(float(v.detach()), 5) for k, v in loss_dict.items() if not k[-1].isdigit()} if loss_dict
             else "none, its predictions are NaN or Inf (the Hungarian matcher refused them)")
    last = job.last_checkpoint or "none yet"
    return (f"non-finite loss ({loss}) at step {job.state.global_step + 1}, epoch {job.state.epoch}; loss terms of "
            f"this process: {terms}. Training stopped and this state was NOT saved; the last good checkpoint is "
            f"{last}. Try a lower --learning_rate, --max_grad_norm 0.1, --mixed_precision no, or check the data.")


def dump_first_step(job: Job, batch: Mapping[str, Any], loss: float, loss_dict: Mapping[str, Tensor]) -> None:
    """Save the first step's loss (mean over processes) and gradients (after DDP's all-reduce, before
    clipping) to ``--dump_first_step``: the distributed-equivalence test compares them."""
    from accelerate.utils import gather_object

    image_ids = gather_object([int(t["image_id"]) for t in batch["labels"]])
    if job.accelerator.is_main_process:
        model = job.accelerator.unwrap_model(job.model)
        grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss, "grads": grads, "image_ids": image_ids, "num_processes": job.accelerator.num_processes,
                    "loss_dict": {k: float(v) for k, v in loss_dict.items()}}, job.args.dump_first_step)


def log_step(job: Job, running: _Running, progress: Any) -> None:
    """Mean loss terms over processes and steps since the last log; lr; throughput."""
    keys = sorted(running.terms)
    sums = torch.tensor([running.terms[k] for k in keys] + [running.steps, running.samples], dtype=torch.float64,
                        device=job.accelerator.device)
    sums = job.accelerator.reduce(sums, reduction="sum")
    steps, samples = float(sums[-2]), float(sums[-1])
    elapsed = time.perf_counter() - running.start
    metrics = {f"train_{k}": float(v) / steps for k, v in zip(keys, sums[:-2])}
    metrics.update({"epoch": job.state.epoch, "lr": job.optimizer.param_groups[0]["lr"],
                    "images_per_s": samples / max(elapsed, 1e-9)})
    if len(job.optimizer.param_groups) > 1:
        metrics["lr_backbone"] = job.optimizer.param_groups[1]["lr"]
    job.metrics.log(metrics, job.state.global_step)
    running.reset()


def maybe_evaluate(job: Job, final: bool = False) -> dict[str, float] | None:
    """COCO AP on the eval split (every ``--eval_every_epochs`` epochs, and at the end)."""
    if job.eval_loader is None or job.references is None:
        return None
    if final and job.last_eval_step == job.state.global_step:
        return job.last_eval
    start = time.perf_counter()
    result = evaluate_coco(job.model, job.eval_loader, job.processor, job.accelerator, job.references,
                           job.label_to_category_id)
    job.last_eval, job.last_eval_step = result, job.state.global_step
    metrics = {f"eval_{k}": v for k, v in result.items()}
    metrics.update({"epoch": job.state.epoch, "eval_runtime_s": time.perf_counter() - start,
                    "elapsed_s": time.perf_counter() - job.started})
    job.metrics.log(metrics, job.state.global_step)
    logger.info("step %d eval: AP %.3f AP50 %.3f AP75 %.3f (%d images)", job.state.global_step, result["AP"],
                result["AP50"], result["AP75"], result["num_images"])
    return result


def train_loop(job: Job, stop: StopRequest) -> int | None:
    """Run until ``max_steps``; returns the signal number if stopped by a signal (after a checkpoint)."""
    from tqdm.auto import tqdm

    args, state, acc = job.args, job.state, job.accelerator
    progress = tqdm(total=job.max_steps, initial=state.global_step, disable=not acc.is_local_main_process,
                    desc="train", dynamic_ncols=True)
    running = _Running()
    try:
        while state.global_step < job.max_steps:
            loader = epoch_loader(job, state.epoch)
            for batch in loader:
                loss, stop_now, loss_dict = train_step(job, batch, stop)
                state.batches_in_epoch += 1
                running.add(loss_dict, len(batch["labels"]))
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{job.optimizer.param_groups[0]['lr']:.2e}", epoch=state.epoch)
                if state.global_step % args.logging_steps == 0:
                    log_step(job, running, progress)
                if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
                    save_job_checkpoint(job)
                if stop_now:
                    save_job_checkpoint(job)
                    return stop.signum or signal.SIGTERM
                if state.global_step >= job.max_steps:
                    break
            if state.batches_in_epoch >= len(job.train_loader):  # a full epoch: its end-of-epoch work
                finished = state.epoch + 1
                if finished % args.eval_every_epochs == 0 and state.global_step < job.max_steps:
                    maybe_evaluate(job)
                if args.checkpointing_epochs and finished % args.checkpointing_epochs == 0:
                    save_job_checkpoint(job)
                state.epoch, state.batches_in_epoch = finished, 0
    finally:
        progress.close()
    if running.steps:
        log_step(job, running, progress)
    # the final state, so `--resume_from_checkpoint latest --max_steps M` can continue it
    save_job_checkpoint(job)
    return None


def save_final(job: Job, eval_result: dict[str, float] | None, runtime: float) -> dict[str, Any]:
    """Model + processor (remote code) into ``output_dir``, ``all_results.json``, the detections picture."""
    acc = job.accelerator
    acc.wait_for_everyone()
    results: dict[str, Any] = {k: (eval_result or {}).get(k, float("nan")) for k in METRIC_KEYS}
    results.update({
        "eval_num_images": (eval_result or {}).get("num_images", 0), "eval_split": job.eval_split,
        "global_step": job.state.global_step, "epoch": job.state.epoch, "num_processes": acc.num_processes,
        "total_train_batch_size": job.state.total_batch_size, "train_runtime_s": round(runtime, 2),
        "mixed_precision": acc.mixed_precision, "model_config": job.args.model_config,
    })
    if acc.is_main_process:
        model = acc.unwrap_model(job.model)
        model.save_pretrained(job.output_dir)
        type(job.processor).register_for_auto_class("AutoImageProcessor")
        job.processor.save_pretrained(job.output_dir)
        (job.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        if job.eval_split is not None and job.args.picture_images > 0:
            eval_ds = without_image_decoding(job.data.dataset[job.eval_split])
            save_detection_picture(model, job.processor, eval_ds, job.output_dir / PICTURE_FILE, job.args.picture_images)
        plot_training_curves(job.output_dir / METRICS_FILE, job.output_dir / CURVES_FILE,
                             title=f"{job.output_dir.name} ({job.args.model_config})")
    acc.wait_for_everyone()
    return results


# What a run leaves in its output_dir: a new run into a folder holding any of them would mix two runs (and reuse
# the old checkpoints, or continue the old run on a later `--resume_from_checkpoint latest`).
RUN_FILES = (CHECKPOINTS_DIR, ARGS_FILE, METRICS_FILE, RESULTS_FILE, "model.safetensors", PICTURE_FILE, CURVES_FILE,
             "logs")


def previous_run_files(args: Any) -> list[Path]:
    """The files of an earlier run in ``--output_dir`` (created if needed) that this run will replace.

    [] for a new or unrelated folder and when resuming from one of its own checkpoints. Raises ValueError, before
    anything is written, when the folder holds an earlier run and ``--overwrite_output_dir`` is not given.
    """
    output_dir = make_output_folder(args.output_dir, "--output_dir")
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    if not found or resumes_own_checkpoint(args.resume_from_checkpoint, output_dir):
        return []
    if not getattr(args, "overwrite_output_dir", False):
        raise ValueError(f"--output_dir {output_dir} holds a previous run ({', '.join(p.name for p in found)}); "
                         "continue it with --resume_from_checkpoint latest, choose a new --output_dir, or pass "
                         "--overwrite_output_dir to replace it (nothing was written)")
    return found


def resumes_own_checkpoint(resume: str | None, output_dir: Path) -> bool:
    """True when ``--resume_from_checkpoint`` continues a run of ``output_dir``: latest, or one of its checkpoints."""
    if resume == "latest":
        return bool(list_checkpoints(output_dir))
    return bool(resume) and Path(resume).resolve().parent == (output_dir / CHECKPOINTS_DIR).resolve()


def delete_previous_run(job: Job, files: Sequence[Path]) -> None:
    """``--overwrite_output_dir``: delete the earlier run's ``files`` before this run writes its own."""
    if job.accelerator.is_main_process:
        logger.warning("--overwrite_output_dir: deleting the previous run's %s in %s", [p.name for p in files],
                       job.output_dir)
        for path in files:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    job.accelerator.wait_for_everyone()


def args_to_dict(args: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def run_training(args: Any) -> dict[str, Any]:
    """The whole job; returns the final results (``all_results.json``).

    Raises NonFiniteLossError when the loss stops being finite; exits via SystemExit(128 + signal)
    after checkpointing when SIGTERM/SIGINT arrive.
    """
    args = resolve_defaults(args)
    previous = previous_run_files(args)
    job = setup(args)
    acc = job.accelerator
    if previous:
        delete_previous_run(job, previous)
    if acc.is_main_process:
        (job.output_dir / ARGS_FILE).write_text(json.dumps(args_to_dict(args), indent=2, default=str))
        logger.info("%d process(es) on %s, mixed precision %s; %d steps (%d per epoch, %d epochs); total batch %d",
                    acc.num_processes, acc.device, acc.mixed_precision, job.max_steps, job.steps_per_epoch,
                    job.num_epochs, job.state.total_batch_size)
    if args.report_to not in (None, "none"):
        tracker_config = {k: v for k, v in args_to_dict(args).items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers(args.tracker_project_name, config=tracker_config)
    stop = StopRequest().install()
    start = time.perf_counter()
    try:
        signum = train_loop(job, stop)
    except NonFiniteLossError as err:
        job.metrics.log({"event": "non_finite_loss", "message": str(err)}, job.state.global_step)
        acc.end_training()
        raise
    finally:
        stop.restore()
    if signum is not None:
        acc.end_training()
        logger.warning("stopped by %s at step %d; checkpoint %s; continue with --resume_from_checkpoint latest",
                       signal.Signals(signum).name, job.state.global_step, job.last_checkpoint)
        raise SystemExit(128 + int(signum))
    eval_result = maybe_evaluate(job, final=True)
    results = save_final(job, eval_result, time.perf_counter() - start)
    acc.end_training()
    if acc.is_main_process:
        logger.info("saved the model to %s; results: %s", job.output_dir,
                    {k: results[k] for k in ("AP", "AP50", "AP75", "global_step", "num_processes")})
    return results


# ----------------------------------------------------------------------------- standalone evaluation


def label_to_category_id_of(config: Any, data: DetectionData) -> dict[int, int]:
    """Model label -> dataset category id: the mapping saved at training, else the dataset's."""
    saved = getattr(config, "label_to_category_id", None)
    if saved:
        return {int(k): int(v) for k, v in saved.items()}
    return dict(data.label_mapping.label_to_category_id)


def evaluate_folder(args: Any) -> dict[str, Any]:
    """`scripts/evaluate.py`: COCO AP of a saved model folder on a dataset split (any process count)."""
    from accelerate import Accelerator
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    configure_logging(accelerator)
    model = load_checked(AutoModelForObjectDetection, args.model, trust_remote_code=True)  # refuses incomplete/NaN
    try:
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    except (OSError, ValueError):
        logger.warning("no image processor in %s: using DETR's defaults", args.model)
        processor = DetrCustomImageProcessor()
    if args.image_size:
        processor.size = {"shortest_edge": args.image_size, "longest_edge": round(1333 * args.image_size / 800)}
    contiguous = getattr(model.config, "contiguous_labels", False) if args.contiguous_labels is None else args.contiguous_labels
    args.contiguous_labels = contiguous
    with accelerator.main_process_first():
        data = load_data(args)
    split = args.split or find_split(data.dataset, "eval")
    if split not in data.dataset:
        raise ValueError(f"split {split!r} not in the dataset; splits: {list(data.dataset)}")
    dataset = without_image_decoding(data.dataset[split])
    if args.max_eval_samples:
        dataset = dataset.select(range(min(args.max_eval_samples, len(dataset))))
    mapping = label_to_category_id_of(model.config, data)
    references = metric_references(dataset, data.label_mapping.label_to_category_id)
    loader = accelerator.prepare(make_eval_dataloader(dataset, processor, args.batch_size, args.dataloader_num_workers))
    model = accelerator.prepare(model)
    start = time.perf_counter()
    result = evaluate_coco(model, loader, processor, accelerator, references, mapping)
    result.update({"split": split, "num_processes": accelerator.num_processes, "model": str(args.model),
                   "eval_runtime_s": round(time.perf_counter() - start, 2)})
    return result


__all__ = [
    "MODEL_PRESETS", "TRAINING_PRESETS", "SYNTHETIC_DEFAULTS", "resolve_defaults", "synthetic_coco_dir", "load_data",
    "EpochShuffleSampler", "DetrCollator", "create_model", "param_groups", "lr_factor", "TrainState",
    "list_checkpoints", "resolve_checkpoint", "save_checkpoint", "predict", "gather_predictions", "evaluate_coco",
    "draw_detections", "NonFiniteLossError", "run_training", "evaluate_folder",
]
