"""What a run is built from, each made from the (resolved, frozen) options: data, loaders, model, optimizer, schedule.

Box formats: dataset rows hold absolute COCO ``[x, y, w, h]`` pixels; model targets are normalised ``(cx, cy, w, h)``
relative to each image's UNPADDED size (the collator's job, `data/collate.py`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from ..checks import CLASS_HEAD_KEYS, exception_chain, load_checked, read_json
from ..configuration_detr_custom import DetrCustomConfig
from ..data import (
    Compose,
    DetectionData,
    DetrCollator,
    EpochShuffleSampler,
    find_split,
    load_coco_folder_with_info,
    load_detection_dataset,
    load_yolo_folder_with_info,
    make_flip_colour_transforms,
    make_train_transforms,
    scaled_train_transform_kwargs,
    synthetic_coco_dir,
)
from ..image_processing_detr_custom import DetrCustomImageProcessor
from ..modeling_detr_custom import DetrCustomForObjectDetection
from .arguments import DataArguments, TrainArguments, finetune_recipe_line
from .presets import MODEL_PRESETS

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def load_data(args: DataArguments, contiguous_labels: bool) -> DetectionData:
    """The dataset of the options: a Hub name, a saved dataset, a YOLO or COCO folder, or the synthetic default,
    with its boxes read in ``--box_format`` (COCO xywh pixels when unset). `data_check.py` checks it next.

    Call under ``accelerator.main_process_first()`` with several processes (it may build caches).
    """
    datasets_cache = str(Path(args.cache_dir) / "datasets") if args.cache_dir else None
    box_format = args.box_format or "xywh"
    if args.dataset_name or args.dataset_path:
        return load_detection_dataset(dataset_name=args.dataset_name, dataset_path=args.dataset_path,
                                      contiguous_labels=contiguous_labels, on_bad_data=args.on_bad_data,
                                      cache_dir=datasets_cache, box_format=box_format)
    if args.yolo_dir:
        if args.box_format:
            raise ValueError(f"--box_format {args.box_format} does not apply to a YOLO folder: its labels are "
                             "'class cx cy w h' normalised to [0, 1] by definition; leave --box_format out")
        return load_yolo_folder_with_info(args.yolo_dir, on_bad_data=args.on_bad_data,
                                          full_decode_check=args.full_decode_check, cache_dir=datasets_cache)
    coco_dir = args.coco_dir or synthetic_coco_dir(args.cache_dir, args.synthetic_spec())
    return load_coco_folder_with_info(coco_dir, contiguous_labels=contiguous_labels, on_bad_data=args.on_bad_data,
                                      full_decode_check=args.full_decode_check, cache_dir=datasets_cache,
                                      box_format=box_format)


def make_image_processor(args: TrainArguments) -> DetrCustomImageProcessor:
    """The processor saved with the model: short side ``image_size``, long side ``max_size``; the other
    settings from the ``--model_name_or_path`` folder's processor when it has one."""
    size = {"shortest_edge": int(args.image_size), "longest_edge": int(args.max_size)}
    source = args.model_name_or_path
    if source and (Path(source) / "preprocessor_config.json").is_file():
        processor = DetrCustomImageProcessor.from_pretrained(source)
        processor.size = size
        return processor
    return DetrCustomImageProcessor(size=size)


def make_train_transform(args: TrainArguments) -> Compose | None:
    """The training augmentation of ``args`` (resolved): the flips and colour change it asks for, then DETR's
    multi-scale resize and crop scaled to ``image_size`` with --augmentation; None when there is none (the
    processor then only resizes)."""
    if args.augmentation:
        kwargs = scaled_train_transform_kwargs(args.image_size)
        kwargs["max_size"] = args.max_size
        return make_train_transforms(**kwargs, fliplr=args.fliplr, flipud=args.flipud,
                                     channel_shuffle=args.channel_shuffle)
    transforms = make_flip_colour_transforms(args.fliplr, args.flipud, args.channel_shuffle)
    return Compose(transforms) if transforms else None


def split_names(args: TrainArguments, data: DetectionData) -> tuple[str, str | None]:
    """(train split, eval split or None when the dataset has none), checked against the dataset."""
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
    return train_split, eval_split


def first_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def make_train_dataloader(args: TrainArguments, dataset: datasets.Dataset, processor: DetrCustomImageProcessor,
                          split: str = "train") -> DataLoader:
    """Seeded (seed, epoch) order and augmentation; drops the last incomplete batch, as the original DETR."""
    if len(dataset) < args.per_device_train_batch_size:
        raise ValueError(f"the {split!r} split has {len(dataset)} images, fewer than "
                         f"--per_device_train_batch_size {args.per_device_train_batch_size}")
    return DataLoader(
        dataset, batch_size=args.per_device_train_batch_size, drop_last=True,
        sampler=EpochShuffleSampler(len(dataset), args.seed),
        collate_fn=DetrCollator(processor, make_train_transform(args), seed=args.seed),
        num_workers=args.dataloader_num_workers,
        # its own generator: creating an iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(args.seed))


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
    return {k: v for k, v in config.to_dict().items() if k not in (
        "id2label", "label2id", "auto_map", "model_type", "transformers_version", "architectures",
        "label_to_category_id", "contiguous_labels")}


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


def create_model(args: TrainArguments, data: DetectionData, resuming: bool = False) -> DetrCustomForObjectDetection:
    """A fresh model (preset + overrides, ImageNet backbone per ``--backbone_weights``) or
    ``--model_name_or_path`` with the dataset's label set (class head replaced if it differs).

    The config records the dataset's label -> category id mapping and ``contiguous_labels`` for evaluation.
    ``resuming``: a checkpoint replaces every weight next, so the backbone weights are not loaded (a resume then
    needs no network).
    """
    id2label = {int(k): str(v) for k, v in data.label_mapping.id2label.items()}
    facts = dict(label_to_category_id=dict(data.label_mapping.label_to_category_id),
                 contiguous_labels=args.contiguous_labels)
    if args.model_name_or_path:
        logger.info("%s", finetune_recipe_line(args))
        return load_for_finetuning(args.model_name_or_path, id2label, args.config_overrides, **facts)
    config = DetrCustomConfig(**model_config_kwargs(args.model_config), id2label=id2label, **facts)
    apply_config_overrides(config, args.config_overrides)
    model = DetrCustomForObjectDetection(config)
    if args.backbone_weights == "none":
        pass  # a random backbone: construction already starts its frozen BatchNorms at scale 1
    elif resuming:
        logger.info("resuming: the backbone's weights come from the checkpoint (--backbone_weights %s not loaded)",
                    args.backbone_weights)
    else:
        load_backbone_weights(model, args.backbone_weights)
    return model


def load_backbone_weights(model: DetrCustomForObjectDetection, weights: str) -> None:
    """``--backbone_weights timm`` (the ImageNet weights of ``config.backbone``, fetched from the Hub by timm) or a
    local file; weights that cannot be fetched are one ValueError line with the ways out."""
    if weights != "timm":
        model.load_pretrained_backbone(weights)
        return
    try:
        model.load_pretrained_backbone(None)
    except Exception as err:  # noqa: BLE001 - huggingface_hub / httpx / OSError: which one depends on the failure
        if not is_fetch_failure(err):
            raise
        raise ValueError(f"--backbone_weights timm: the ImageNet weights of the backbone {model.config.backbone!r} "
                         f"({timm_weights_name(model.config.backbone)} on the Hugging Face Hub) cannot be fetched: "
                         f"{fetch_failure_reason(err)}; give a local weights file with --backbone_weights PATH, train "
                         "the backbone from scratch with --backbone_weights none, or fetch them once while online "
                         "(timm caches them in HF_HOME)") from None


def is_fetch_failure(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a download that failed: offline mode, no cache entry, no network."""
    for cause in exception_chain(err):
        if isinstance(cause, (OSError, ConnectionError, TimeoutError)):
            return True
        if type(cause).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3"):
            return True
    return False


def fetch_failure_reason(err: BaseException) -> str:
    """Offline mode when that is the cause (HF_HUB_OFFLINE), else the first line of the deepest error."""
    chain = exception_chain(err)
    if any(type(c).__name__ == "OfflineModeIsEnabled" for c in chain):
        return "offline mode is on (HF_HUB_OFFLINE=1) and they are not in the local cache"
    deepest = chain[-1]
    return f"{type(deepest).__name__}: {(str(deepest).splitlines() or [''])[0][:200]}"


def timm_weights_name(backbone: str) -> str:
    """The Hub repo timm fetches the default weights of ``backbone`` from, e.g. timm/resnet50.a1_in1k."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone)
        return getattr(cfg, "hf_hub_id", None) or f"timm's {backbone}"
    except Exception:  # noqa: BLE001 - only for the message
        return f"timm's {backbone}"


def load_for_finetuning(path: str, id2label: dict[int, str], overrides: str | None,
                        label_to_category_id: Mapping[int, int], contiguous_labels: bool
                        ) -> DetrCustomForObjectDetection:
    """Load a saved/converted model for a new label set.

    The class head is rebuilt for the new labels (`keep_known_class_rows`): the classes the model already knows by
    name keep their rows (weight and bias) at their new index, the no-object row (the last) is kept, and the new
    classes start from the head's init. With the same labels in the same order the model is loaded as saved.
    """
    config = DetrCustomConfig.from_pretrained(path)
    old = {int(k): str(v) for k, v in config.id2label.items()}
    config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
    config.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
    config.contiguous_labels = contiguous_labels
    apply_config_overrides(config, overrides)
    # missing keys are allowed (new layers from --config_overrides start from scratch, logged); corrupt or
    # non-finite weights are not
    model = load_checked(DetrCustomForObjectDetection, path, allow_missing=True, config=config,
                         ignore_mismatched_sizes=True)
    if old != id2label:
        saved = saved_class_head(path)
        kept, new = keep_known_class_rows(model, old, id2label, saved)
        if saved is None:
            logger.info("new label set (%d labels, was %d): the saved class head cannot be read, so it starts from "
                        "scratch", len(id2label), len(old))
        else:
            logger.info("new label set (%d labels, was %d): the class head keeps the rows of the no-object class and "
                        "of %d known by name %s; %d new start fresh %s", len(id2label), len(old), len(kept),
                        shown_names(kept), len(new), shown_names(new))
    return model


def keep_known_class_rows(model: DetrCustomForObjectDetection, old: Mapping[int, str], new: Mapping[int, str],
                          saved: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[list[str], list[str]]:
    """Re-initialise the class head of ``model`` (labels ``new``) and copy into it, from ``saved`` (the (weight,
    bias) of a head for the labels ``old``), the rows of the classes named in both and the no-object row (the last).

    Names that do not identify a class are never matched: raw COCO ids' "N/A" gaps and names given twice. Returns
    (the names kept, the names that start fresh), in the new label order.
    """
    head = model.class_labels_classifier
    head.reset_parameters()  # the head's init (PyTorch's Linear default, as `_init_weights` gives it)
    names = [str(new[i]) for i in sorted(new)]
    if saved is None:
        return [], names
    weight, bias = saved
    if weight.shape[1] != head.in_features or weight.shape[0] != bias.shape[0]:
        return [], names  # another d_model (--config_overrides): nothing fits
    old_counts, new_counts = Counter(map(str, old.values())), Counter(map(str, new.values()))
    old_index = {str(name): int(i) for i, name in old.items()
                 if old_counts[str(name)] == 1 and not str(name).startswith("N/A") and int(i) < weight.shape[0] - 1}
    kept, fresh = [], []
    with torch.no_grad():
        for i in sorted(new):
            name = str(new[i])
            j = old_index.get(name)
            if j is None or new_counts[name] > 1:
                fresh.append(name)
                continue
            head.weight[i].copy_(weight[j])
            head.bias[i].copy_(bias[j])
            kept.append(name)
        head.weight[-1].copy_(weight[-1])
        head.bias[-1].copy_(bias[-1])
    return kept, fresh


def saved_class_head(path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The class head (weight, bias) stored at ``path`` (a model folder, or a Hub id already in the local cache), read
    without loading the rest; None when no weights file with it can be found."""
    from huggingface_hub import try_to_load_from_cache
    from safetensors import safe_open

    def locate(name: str) -> Path | None:
        if Path(path).is_dir():
            return Path(path) / name if (Path(path) / name).is_file() else None
        try:
            found = try_to_load_from_cache(path, name)
        except ValueError:  # not a repo id
            return None
        return Path(found) if isinstance(found, str) else None

    keys = CLASS_HEAD_KEYS
    index = locate("model.safetensors.index.json")
    files = ({key: locate(read_json(index)["weight_map"].get(key, "")) for key in keys} if index
             else dict.fromkeys(keys, locate("model.safetensors")))
    if all(files.values()):
        tensors = []
        for key in keys:
            with safe_open(str(files[key]), framework="pt") as f:
                tensors.append(f.get_tensor(key) if key in f.keys() else None)
    else:
        binary = locate("pytorch_model.bin")
        state = torch.load(binary, map_location="cpu", weights_only=True) if binary else {}
        tensors = [state.get(key) for key in keys]
    return None if any(t is None for t in tensors) else (tensors[0].float(), tensors[1].float())


def shown_names(names: list[str], limit: int = 20) -> str:
    """``names`` for a log line: all of them, or the first ``limit`` and how many in all."""
    return str(names) if len(names) <= limit else f"{names[:limit]} ... ({len(names)} in all)"


# ----------------------------------------------------------------------------- optimizer, schedule


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
    groups = [{"params": rest, "lr": learning_rate, "initial_lr": learning_rate, "weight_decay": weight_decay,
               "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": backbone_learning_rate, "initial_lr": backbone_learning_rate,
                       "weight_decay": weight_decay, "name": "backbone"})
    return groups


def make_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.AdamW:
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
