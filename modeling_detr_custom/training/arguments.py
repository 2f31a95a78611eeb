"""The options of `scripts/train.py` and `scripts/evaluate_model.py`: typed, frozen dataclasses.

Parsed with transformers' `HfArgumentParser` (``--name value``, booleans as ``--flag``), from the command line over
an options file (``--config file.yaml|json``, keys = option names) over the defaults. A field left at None takes
the value of the ``--model_config`` preset (`presets.py`); `resolve_options` returns a NEW object with every such
field filled in and checked, which is what the run uses and what ``training_args.json`` records. Nothing changes
an options object after that.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from transformers import HfArgumentParser

from ..checks import DEBUG_ENV, read_json
from ..coco_metric import resolve_backend
from ..configuration_detr_custom import DetrCustomConfig
from ..data import SYNTHETIC_DEFAULTS, BoxFormat
from ..outputs import ARGS_FILE
from .presets import (
    ARCHITECTURE_KEYS,
    MODEL_PRESETS,
    TRAINING_PRESETS,
    finetune_recipe,
)

PRESET = "default: from the --model_config preset"
DATA_SOURCES = ("dataset_name", "coco_dir", "dataset_path", "yolo_dir")


def _opt(help: str, default: Any = None, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class DataArguments:
    """Where the images come from: a Hub dataset, a COCO folder, a saved dataset, or the synthetic shapes."""

    dataset_name: str | None = _opt("a Hub detection dataset (the schema of modeling_detr_custom/data/schema.py)")
    coco_dir: str | None = _opt("COCO folder: annotations/instances_<split>.json + image folders")
    dataset_path: str | None = _opt("a datasets.save_to_disk folder with the detection schema")
    yolo_dir: str | None = _opt("an ultralytics YOLO folder: data.yaml (names, split paths), images/<split>/, "
                                "labels/<split>/*.txt (class cx cy w h, normalised)")
    max_eval_samples: int | None = _opt("evaluate only the first N images")
    cache_dir: str | None = _opt("synthetic data and datasets cache (default ~/.cache/detr_custom)")
    on_bad_data: Literal["skip", "raise"] = _opt(
        "skip (and count in the log) or raise on missing/corrupt images, unknown categories", "skip")
    full_decode_check: bool = _opt("decode every image up front (slow; also finds truncated files)", False)
    box_format: BoxFormat | None = _opt(
        "the boxes of a COCO folder or a Hub / saved dataset: xywh (COCO's, the default), xyxy (corners), cxcywh, or "
        "one of them _normalized to [0, 1] by the image size; converted to COCO xywh pixels when loading (YOLO "
        "folders: always normalised cx cy w h)")
    coco_eval_backend: Literal["auto", "faster", "pycocotools"] = _opt(
        "COCO AP engine: faster-coco-eval (same AP, several times faster), pycocotools, or auto (faster if "
        "installed)", "auto")
    synthetic_num_train: int | None = _opt(
        f"synthetic shapes: training images (default {SYNTHETIC_DEFAULTS['num_train']})")
    synthetic_num_val: int | None = _opt(
        f"synthetic shapes: validation images (default {SYNTHETIC_DEFAULTS['num_val']})")
    synthetic_image_size: int | None = _opt(
        f"synthetic shapes: image side (default {SYNTHETIC_DEFAULTS['image_size']})")
    synthetic_num_classes: int | None = _opt(f"synthetic shapes: classes (default {SYNTHETIC_DEFAULTS['num_classes']})")
    synthetic_min_shapes: int | None = _opt(
        f"synthetic shapes: fewest per image (default {SYNTHETIC_DEFAULTS['min_shapes']})")
    synthetic_max_shapes: int | None = _opt(
        f"synthetic shapes: most per image (default {SYNTHETIC_DEFAULTS['max_shapes']})")
    synthetic_seed: int | None = _opt(f"synthetic shapes: seed (default {SYNTHETIC_DEFAULTS['seed']})")

    def synthetic_spec(self) -> dict[str, int]:
        """The synthetic-dataset settings given (the rest take SYNTHETIC_DEFAULTS)."""
        return {k: getattr(self, f"synthetic_{k}") for k in SYNTHETIC_DEFAULTS
                if getattr(self, f"synthetic_{k}") is not None}

    def has_dataset(self) -> bool:
        return bool(self.sources())

    def sources(self) -> list[str]:
        """The dataset options given (at most one is allowed)."""
        return [k for k in DATA_SOURCES if getattr(self, k)]


@dataclass(frozen=True)
class TrainArguments(DataArguments):
    """Every option of `scripts/train.py`; None means "from the preset" where the help says so."""

    contiguous_labels: bool = _opt("labels 0..K-1 instead of raw COCO category ids (num_labels = max id + 1)", False)
    train_split: str | None = _opt("default: train")
    eval_split: str | None = _opt("default: validation/val/valid/test, the first that exists")
    max_train_samples: int | None = _opt("use only the first N training images")
    # model
    model_config: str | None = _opt(f"preset {sorted(MODEL_PRESETS)} or a config.json / model folder "
                                    "(default: with --model_name_or_path the preset that model was trained with, "
                                    "else demo without a dataset argument and r50 with one)")
    config_overrides: str | None = _opt('e.g. "d_model=64,num_queries=20" (DetrCustomConfig fields)')
    model_name_or_path: str | None = _opt("start from a saved/converted detr-custom folder; with new labels the "
                                          "class head keeps the rows of the classes it knows by name (and no object), "
                                          "the others start fresh; the recipe is its preset's fine-tune")
    backbone_weights: str | None = _opt(f"fresh model: 'timm' (ImageNet, downloads), 'none' (random) or a local "
                                        f"file; {PRESET}")
    image_size: int | None = _opt(f"short side for evaluation and largest training scale; {PRESET} (or the "
                                  "--model_name_or_path processor's)")
    max_size: int | None = _opt("long-side limit (default 1333 * image_size / 800)")
    # Optional[bool], not bool | None: what HfArgumentParser reads as a flag with an optional value
    augmentation: Optional[bool] = _opt(  # noqa: UP045
        f"DETR's flip + multi-scale + crop, scaled to --image_size; {PRESET} "
                                        "(demo: off); --no_augmentation: only resize and the three options below",
                                        nargs="?", const=True)
    fliplr: float | None = _opt("probability of a horizontal flip (ultralytics' name); default: 0.5 with "
                                "--augmentation (DETR's), else the recipe's (0; a demo model's fine-tune: 0.5)")
    flipud: float | None = _opt("probability of a vertical flip: for data whose classes do not depend on which way "
                                "is up; default: the recipe's (0; a demo model's fine-tune: 0.5)")
    channel_shuffle: float | None = _opt("probability of the RGB channels in a random order: for data whose classes "
                                         "do not depend on colour; default: the recipe's (0; a demo model's "
                                         "fine-tune: 1)")
    # training
    output_dir: str = _opt("the run's folder", "outputs/detr-custom")
    overwrite_output_dir: bool = _opt("start a new run in an --output_dir that holds a previous one, deleting that "
                                      "run's checkpoints and records (without it, such a folder is refused)", False)
    per_device_train_batch_size: int | None = _opt(PRESET)
    per_device_eval_batch_size: int | None = _opt("default: the training batch size")
    gradient_accumulation_steps: int = _opt("micro-batches per optimizer step", 1)
    num_train_epochs: int | None = _opt(PRESET)
    max_steps: int | None = _opt("optimizer steps; overrides --num_train_epochs")
    learning_rate: float | None = _opt(f"transformer and heads; {PRESET} (r50: 1e-4)")
    backbone_learning_rate: float | None = _opt(f"0 freezes the backbone; {PRESET} (r50: 1e-5)")
    weight_decay: float = _opt("AdamW weight decay, on every parameter as the original", 1e-4)
    max_grad_norm: float = _opt("gradient clipping; 0 disables", 0.1)
    lr_drop_epochs: int | None = _opt(f"lr x0.1 every N epochs (StepLR), 0: never; {PRESET} (r50: 200)")
    warmup_steps: int | None = _opt(f"linear lr warmup steps; {PRESET} (r50: 0, the original has none)")
    seed: int = _opt("each process uses seed + its rank", 42)
    ema_decay: float | None = _opt("keep an exponential moving average of the weights with this decay (e.g. 0.9999, "
                                   "RT-DETR's) and evaluate, save and ship it; default: off (the paper has none)")
    ema_warmup_steps: int = _opt("EMA warmup: decay x (1 - exp(-updates / N)), RT-DETR's 2000", 2000)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _opt("default: from accelerate launch/config")
    cpu: bool = _opt("run on the CPU even with a GPU", False)
    dataloader_num_workers: int = _opt("dataloader worker processes", 0)
    num_threads: str | None = _opt("torch CPU threads of each process: N, 0 (torch's default: all cores) or 'auto' "
                                   f"(the idle cores, at most 4); {PRESET} (demo: auto)")
    # logging, evaluation, checkpoints
    logging_steps: int = _opt("log the loss terms every N optimizer steps (the only host read of the loss)", 10)
    eval_every_epochs: int = _opt("COCO evaluation every N epochs (and at the end)", 1)
    checkpointing_steps: int = _opt("save every N optimizer steps (0: off)", 0)
    checkpointing_epochs: int = _opt("save every N epochs (0: off)", 1)
    checkpoints_total_limit: int | None = _opt("keep the newest K checkpoints", 2)
    resume_from_checkpoint: str | None = _opt("'latest' (newest in output_dir; none yet = fresh start) or a folder")
    report_to: str = _opt("accelerate trackers: tensorboard, wandb, all, none", "none")
    tracker_project_name: str = _opt("tracker project", "detr_custom")
    picture_images: int = _opt("validation images in detections.png, training images in data_samples.png and "
                               "training_inputs.png (0: none)", 4)
    dump_first_step: str | None = _opt("debugging: save the first step's loss and gradients to this file")
    debug: bool = _opt(f"show the traceback of an error, not only its one-line message (or set {DEBUG_ENV}=1)",
                       False)
    # Hub
    push_to_hub: bool = _opt("upload the final model folder with a model card", False)
    hub_model_id: str | None = _opt("repo id, e.g. you/detr-shapes (required with --push_to_hub)")
    hub_private_repo: bool = _opt("create the repo private", False)

    @property
    def preset(self) -> str:
        """The preset whose training defaults apply: the named one, else r50's (a config file / folder)."""
        return self.model_config if self.model_config in TRAINING_PRESETS else "r50"


def options_parser(dataclass_type: type, description: str) -> HfArgumentParser:
    """HfArgumentParser of ``dataclass_type`` plus ``--config FILE`` (and ``--no_augmentation`` for training)."""
    import argparse

    parser = HfArgumentParser(dataclass_type, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/JSON file of options (keys = option names); the command line wins")
    if any(f.name == "augmentation" for f in dataclasses.fields(dataclass_type)):
        parser.add_argument("--no_augmentation", dest="augmentation", action="store_const", const=False,
                            help="no flip/multi-scale/crop: only resize")
    return parser


def read_options_file(path: str) -> dict[str, Any]:
    """A YAML/JSON mapping of option names (``-`` or ``_``) to values; ``no_augmentation: true`` is accepted."""
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            options = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    else:
        options = read_json(path)
    if not isinstance(options, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(options).__name__}")
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    if "no_augmentation" in options:  # the flag's name, as a file key
        options["augmentation"] = not options.pop("no_augmentation")
    return options


def parse_options(dataclass_type: type, argv: list[str] | None, description: str = "") -> Any:
    """Command line over ``--config`` file over the dataclass defaults; unknown file keys are a ValueError."""
    parser = options_parser(dataclass_type, description)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:  # HfArgumentParser checks the keys (and builds the object, which checks nothing else)
            defaults = dataclasses.asdict(parser.parse_dict(read_options_file(known.config))[0])
        except ValueError as err:
            valid = sorted(f.name for f in dataclasses.fields(dataclass_type))
            raise ValueError(f"{known.config}: {err}; valid options: {valid}") from None
        parser.set_defaults(**defaults)
    # [options, the Namespace of --config]; an unknown option is a ValueError naming it
    return parser.parse_args_into_dataclasses(argv)[0]


def parse_train_args(argv: list[str] | None = None, description: str = "") -> TrainArguments:
    return parse_options(TrainArguments, argv, description)


def processor_size_of(model_name_or_path: str | None) -> dict[str, int] | None:
    """The ``size`` of a model folder's saved image processor, if it has one with a short side."""
    path = Path(model_name_or_path or "") / "preprocessor_config.json"
    if not model_name_or_path or not path.is_file():
        return None
    size = read_json(path).get("size") or {}
    return size if "shortest_edge" in size else None


def model_preset(model_name_or_path: str) -> tuple[str | None, str]:
    """(the preset a saved model was trained with, how that is known), or (None, why it cannot be told).

    A local folder's ``training_args.json`` (train.py's record) naming a preset tells; else the preset whose
    architecture (`presets.ARCHITECTURE_KEYS`) its config.json has, e.g. r50 for converted published DETR-R50 weights.
    """
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        return None, f"{model_name_or_path} is not a local folder"
    try:
        record = read_json(folder / ARGS_FILE) if (folder / ARGS_FILE).is_file() else {}
    except ValueError:
        record = {}
    recorded = record.get("model_config") if isinstance(record, dict) else None
    if recorded in TRAINING_PRESETS:
        return recorded, f"its {ARGS_FILE} records --model_config {recorded}"
    try:
        config = DetrCustomConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        return None, f"its config.json cannot be read ({' '.join(str(err).split())[:200]})"
    for name, kwargs in MODEL_PRESETS.items():
        preset = DetrCustomConfig(**kwargs)
        if all(getattr(config, key, None) == getattr(preset, key) for key in ARCHITECTURE_KEYS):
            return name, f"its config.json has the {name} preset's architecture"
    return None, f"it has no {ARGS_FILE} naming a preset and its config.json matches no preset's architecture"


def resolve_options(args: TrainArguments) -> TrainArguments:
    """A copy of ``args`` with every preset-dependent field filled in, checked (ValueError naming the option).

    The preset is ``--model_config`` if given; else, fine-tuning (``--model_name_or_path``), the preset the model was
    trained with (`model_preset`); else ``demo`` without a dataset argument (the synthetic default) and ``r50`` (the
    original recipe) with one. A fine-tune whose preset is given or found takes `presets.finetune_recipe` (the preset's
    recipe with its fine-tune changes). Fine-tuning a saved model without ``--image_size`` keeps its
    processor's size.
    """
    found = model_preset(args.model_name_or_path)[0] if args.model_name_or_path and not args.model_config else None
    known_recipe = bool(args.model_name_or_path) and bool(args.model_config or found)
    model_config = args.model_config or found or ("r50" if args.has_dataset() else "demo")
    args = dataclasses.replace(args, model_config=model_config)
    recipe = finetune_recipe(args.preset) if known_recipe else TRAINING_PRESETS[args.preset]
    filled = {k: v for k, v in recipe.items() if getattr(args, k) is None}
    saved_size = processor_size_of(args.model_name_or_path) if args.image_size is None else None
    if saved_size:
        filled["image_size"] = saved_size["shortest_edge"]
        filled["max_size"] = args.max_size or saved_size.get("longest_edge")
    args = dataclasses.replace(args, **filled)
    flips = {"fliplr": 0.5 if args.augmentation else 0.0, "flipud": 0.0, "channel_shuffle": 0.0}  # DETR's flip
    args = dataclasses.replace(args, **{k: v for k, v in flips.items() if getattr(args, k) is None})
    validate_train_args(args)
    return dataclasses.replace(
        args, per_device_eval_batch_size=args.per_device_eval_batch_size or args.per_device_train_batch_size,
        max_size=args.max_size or round(1333 * args.image_size / 800), num_threads=str(args.num_threads))


def finetune_recipe_line(args: TrainArguments) -> str:
    """One line for the log of a fine-tune: the recipe ``args`` (resolved) trains with and why."""
    found, how = model_preset(str(args.model_name_or_path))
    if found == args.model_config:
        why = f"the {found} preset's fine-tune, the model's own ({how})"
    elif found is None and args.model_config in TRAINING_PRESETS:
        why = (f"cannot tell the model's preset ({how}): preset {args.model_config}'s (--model_config, or the "
               "default); give --model_config to choose")
    else:
        why = f"--model_config {args.model_config}'s as given (the model's own: {found or 'unknown'})"
    augmentation = "on" if args.augmentation else "off"
    return (f"fine-tune recipe: {why}: batch {args.per_device_train_batch_size}, lr {args.learning_rate:g} (backbone "
            f"{args.backbone_learning_rate:g}), warmup {args.warmup_steps}, {args.num_train_epochs} epochs ("
            f"{f'lr x0.1 after {args.lr_drop_epochs}' if args.lr_drop_epochs else 'no lr drop'}), augmentation "
            f"{augmentation} (fliplr {args.fliplr:g}, flipud "
            f"{args.flipud:g}, channel_shuffle {args.channel_shuffle:g}), image size {args.image_size}; options you "
            "set win")


def check_one_source(args: DataArguments) -> None:
    """At most one dataset option; an evaluation engine that can run (before any work)."""
    resolve_backend(args.coco_eval_backend)
    if len(args.sources()) > 1:
        raise ValueError(f"give at most one of {', '.join('--' + k for k in DATA_SOURCES)}; got {args.sources()}")


def validate_train_args(args: TrainArguments) -> None:
    """Raise ValueError naming the first bad option value."""
    check_one_source(args)
    for key in ("per_device_train_batch_size", "num_train_epochs", "image_size", "gradient_accumulation_steps",
                "eval_every_epochs", "logging_steps"):
        if int(getattr(args, key)) < 1:
            raise ValueError(f"--{key} must be >= 1; got {getattr(args, key)!r}")
    if args.per_device_eval_batch_size is not None and args.per_device_eval_batch_size < 1:
        raise ValueError(f"--per_device_eval_batch_size must be >= 1; got {args.per_device_eval_batch_size}")
    if args.image_size < 32:
        raise ValueError(f"--image_size must be >= 32 pixels (the backbone has stride 32); got {args.image_size}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0; got {args.learning_rate!r}")
    if not (str(args.num_threads) == "auto" or str(args.num_threads).isdigit()):
        raise ValueError(f"--num_threads must be 'auto' or an integer >= 0; got {args.num_threads!r}")
    for key in ("backbone_learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "checkpointing_steps",
                "checkpointing_epochs", "dataloader_num_workers"):
        if getattr(args, key) < 0:
            raise ValueError(f"--{key} must be >= 0; got {getattr(args, key)!r}")
    for key in ("fliplr", "flipud", "channel_shuffle"):
        if not 0.0 <= getattr(args, key) <= 1.0:
            raise ValueError(f"--{key} is a probability in [0, 1]; got {getattr(args, key)!r}")
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), e.g. 0.9999; got {args.ema_decay!r}")
    if args.ema_warmup_steps < 0:
        raise ValueError(f"--ema_warmup_steps must be >= 0; got {args.ema_warmup_steps!r}")
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


# ----------------------------------------------------------------------------- a resume against its run's options

SYNTHETIC_OPTIONS = tuple(f"synthetic_{k}" for k in SYNTHETIC_DEFAULTS)
# What a run trains on and what it is. A resume with another value would continue a different run under the same
# records (training_args.json, metrics.jsonl, the checkpoints), so it is refused. --ema_decay is one of them only
# when it switches the average on or off (`resume_changes`).
RUN_DEFINING_OPTIONS = (*DATA_SOURCES, *SYNTHETIC_OPTIONS, "box_format", "contiguous_labels", "train_split",
                        "max_train_samples", "model_config", "config_overrides", "model_name_or_path",
                        "backbone_weights", "image_size", "max_size", "augmentation", "fliplr", "flipud",
                        "channel_shuffle")
# Used from the resumed step on and logged as a WARNING: the steps from there differ from an uninterrupted run's.
TRAJECTORY_OPTIONS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                      "backbone_learning_rate", "weight_decay", "max_grad_norm", "lr_drop_epochs", "warmup_steps",
                      "seed", "ema_decay", "ema_warmup_steps", "mixed_precision", "full_decode_check", "eval_split",
                      "max_eval_samples")
# How this invocation runs, not what the run is: never compared.
INVOCATION_OPTIONS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "debug")


@dataclass(frozen=True)
class OptionChange:
    """An option whose value at a resume differs from the run's record; ``warn``: it changes the trajectory."""

    name: str
    saved: Any
    new: Any
    warn: bool

    def __str__(self) -> str:
        return f"--{self.name} {shown(self.saved)} -> {shown(self.new)}"


def options_json(args: TrainArguments) -> dict[str, Any]:
    """The options as ``training_args.json`` holds them (JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


def resume_changes(saved: dict[str, Any], args: TrainArguments, where: str) -> list[OptionChange]:
    """The options of a resume (``args``, resolved) that differ from ``saved``, the run's training_args.json
    (``where`` names it in messages). Raises ValueError naming the first run-defining option that differs, its saved
    value and the new one; returns the other changes, to be logged. Options the record lacks (an older version's
    file) are not compared."""
    new_record = options_json(args)
    old, new = comparable(saved), comparable(new_record)
    changes = []
    for name in new_record:
        if name in INVOCATION_OPTIONS or name not in old or old[name] == new[name]:
            continue
        switches_ema = name == "ema_decay" and (old[name] is None) != (new[name] is None)
        if name in RUN_DEFINING_OPTIONS or switches_ema:
            what = "switch the moving average of the weights on or off" if switches_ema else \
                "change the data, the model or how the images are prepared"
            raise ValueError(f"cannot resume with --{name} {shown(new_record[name])}: the run used --{name} "
                             f"{shown(saved[name])} ({where}), and a resume cannot {what}; resume with the run's "
                             f"--{name}, or start a new run in another --output_dir")
        changes.append(OptionChange(name, saved[name], new_record[name], name in TRAJECTORY_OPTIONS))
    return changes


def shown(value: Any) -> str:
    return "unset" if value is None else str(value)


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with equal meanings made equal: the synthetic settings with their defaults (ignored when another
    dataset is used), ``--config_overrides`` as a mapping, existing paths resolved."""
    out = dict(record)
    uses_synthetic = not any(out.get(k) for k in DATA_SOURCES)
    for key, default in SYNTHETIC_DEFAULTS.items():
        name = f"synthetic_{key}"
        if name in out:
            out[name] = (default if out[name] is None else out[name]) if uses_synthetic else None
    if "config_overrides" in out:  # "a=1, b=2" == "b=2,a=1" and "" == unset; a repeated key: the last wins
        pairs = (item.partition("=") for item in str(out["config_overrides"] or "").split(","))
        out["config_overrides"] = sorted({k.strip(): v.strip() for k, _, v in pairs if k.strip()}.items())
    for name in ("coco_dir", "dataset_path", "yolo_dir", "model_name_or_path", "model_config", "backbone_weights"):
        value = out.get(name)
        if isinstance(value, str) and value not in MODEL_PRESETS and Path(value).expanduser().exists():
            out[name] = str(Path(value).expanduser().resolve())
    return out


@dataclass(frozen=True)
class EvalArguments(DataArguments):
    """Every option of `scripts/evaluate_model.py`."""

    model: str = _opt("folder written by scripts/train.py (or any detr-custom folder)", None)
    split: str | None = _opt("default: validation/val/valid/test, the first that exists")
    contiguous_labels: Optional[bool] = _opt(  # noqa: UP045 (see TrainArguments.augmentation)
        "dataset labels 0..K-1 (default: as the model was trained)",
                                             nargs="?", const=True)
    batch_size: int = _opt("images per process and batch", 8)
    image_size: int | None = _opt("override the processor's short side")
    dataloader_num_workers: int = _opt("dataloader worker processes", 0)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _opt("default: from accelerate launch/config")
    dtype: Literal["fp32", "bf16"] = _opt("the model's precision at inference: fp32, or bf16 autocast (needs a CPU "
                                          "with native bfloat16, AVX512-BF16 or AMX, or a GPU with bf16)", "fp32")
    cpu: bool = _opt("run on the CPU even with a GPU", False)
    output_file: str | None = _opt("default: <model>/eval_results.json")
    overwrite_output_file: bool = _opt("replace an existing --output_file (else refused)", False)
    allow_empty_split: bool = _opt("evaluate a split without any usable box (its AP means nothing) instead of "
                                   "refusing it", False)
    debug: bool = _opt(f"show the traceback of an error, not only its one-line message (or set {DEBUG_ENV}=1)",
                       False)


def parse_eval_args(argv: list[str] | None = None, description: str = "") -> EvalArguments:
    args = parse_options(EvalArguments, argv, description)
    if not args.model:
        raise ValueError("--model is required: a folder written by scripts/train.py (or any detr-custom folder)")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1; got {args.batch_size}")
    check_one_source(args)
    return args
