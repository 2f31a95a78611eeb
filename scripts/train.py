"""Train or fine-tune DETR (detr-custom) with accelerate, evaluate it with COCO AP, save a remote-code folder.

    # the built-in demo: synthetic shapes generated once, a CPU-sized DETR, about 10 minutes on 2 cores
    accelerate launch scripts/train.py --output_dir outputs/demo

    # a COCO folder with the original DETR-R50 recipe (ImageNet backbone from timm)
    accelerate launch scripts/train.py --coco_dir /data/coco --output_dir outputs/r50

    # fine-tune a converted published model on a new label set
    accelerate launch scripts/train.py --coco_dir /data/mine --model_name_or_path converted/detr-r50 \\
        --num_train_epochs 50 --output_dir outputs/mine

    # two CPU processes (gloo); `accelerate launch --cpu --num_processes 2` would start only one
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...

    # resume after an interruption (SIGTERM/SIGINT write a checkpoint before exiting)
    accelerate launch scripts/train.py ... --resume_from_checkpoint latest

Options can also come from a YAML or JSON file (`--config file.yaml`, keys = option names); the
command line wins over the file, the file over the preset defaults. Options left unset take the
defaults of the `--model_config` preset (`demo` without a dataset argument, else `r50`).
The training helpers live in modeling_detr_custom/training.py.

A new run refuses an --output_dir that holds a previous run (resume it, or pass --overwrite_output_dir).
Errors in the options, the data or a checkpoint are one line `error: ...` (exit status 1); --debug or
DETR_CUSTOM_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# `python scripts/x.py` puts scripts/ first on sys.path, where evaluate.py would shadow the `evaluate`
# package; drop it, and add the checkout so the package imports without installing
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_detr_custom.checks import DEBUG_ENV, read_json, run_cli  # noqa: E402
from modeling_detr_custom.training import (  # noqa: E402
    MODEL_PRESETS,
    SYNTHETIC_DEFAULTS,
    NonFiniteLossError,
    run_training,
)

PRESET_HELP = "default: from the --model_config preset"


def threads_option(value: str) -> int | str:
    """``--num_threads``: 'auto' or an integer."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer; got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Every option; None means "from the preset" where the help says so."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML/JSON file of options (keys = option names without --)")
    data = p.add_argument_group("data (default: the synthetic shapes, generated once into --cache_dir)")
    data.add_argument("--dataset_name", help="a Hub detection dataset (schema of modeling_detr_custom/data.py)")
    data.add_argument("--coco_dir", help="COCO folder: annotations/instances_<split>.json + image folders")
    data.add_argument("--dataset_path", help="a datasets.save_to_disk folder with the detection schema")
    data.add_argument("--contiguous_labels", action="store_true",
                      help="labels 0..K-1 instead of raw COCO category ids (num_labels = max id + 1)")
    data.add_argument("--train_split", help="default: train")
    data.add_argument("--eval_split", help="default: validation/val/valid/test, the first that exists")
    data.add_argument("--max_train_samples", type=int, help="use only the first N training images")
    data.add_argument("--max_eval_samples", type=int, help="evaluate only the first N images")
    data.add_argument("--cache_dir", help="synthetic data and datasets cache (default ~/.cache/detr_custom)")
    data.add_argument("--on_bad_data", choices=("skip", "raise"), default="skip",
                      help="skip (and count in the log) or raise on missing/corrupt images, unknown categories")
    data.add_argument("--full_decode_check", action="store_true",
                      help="decode every image before training (slow; also finds truncated files)")
    for key, value in SYNTHETIC_DEFAULTS.items():
        data.add_argument(f"--synthetic_{key}", type=int, help=f"synthetic dataset: {key} (default {value})")

    model = p.add_argument_group("model")
    model.add_argument("--model_config", help=f"preset {sorted(MODEL_PRESETS)} or a config.json / model folder "
                                              "(default: demo without a dataset argument, else r50)")
    model.add_argument("--config_overrides", help='e.g. "d_model=64,num_queries=20" (DetrCustomConfig fields)')
    model.add_argument("--model_name_or_path",
                       help="start from a saved/converted detr-custom folder; its class head is replaced when the "
                            "dataset's labels differ")
    model.add_argument("--backbone_weights",
                       help=f"fresh model: 'timm' (ImageNet, downloads), 'none' (random) or a local file; {PRESET_HELP}")
    model.add_argument("--image_size", type=int, help=f"short side for evaluation and largest training scale; {PRESET_HELP}")
    model.add_argument("--max_size", type=int, help="long-side limit (default 1333 * image_size / 800)")
    model.add_argument("--augmentation", dest="augmentation", action="store_const", const=True, default=None,
                       help=f"DETR's flip + multi-scale + crop, scaled to --image_size; {PRESET_HELP} (demo: off)")
    model.add_argument("--no_augmentation", dest="augmentation", action="store_const", const=False,
                       help="no flip/multi-scale/crop: only resize")

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="outputs/detr-custom")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="start a new run in an --output_dir that holds a previous one, deleting that run's "
                            "checkpoints and records (without it, such a folder is refused unless resuming)")
    train.add_argument("--per_device_train_batch_size", type=int, help=PRESET_HELP)
    train.add_argument("--per_device_eval_batch_size", type=int, help="default: the training batch size")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--num_train_epochs", type=int, help=PRESET_HELP)
    train.add_argument("--max_steps", type=int, help="optimizer steps; overrides --num_train_epochs")
    train.add_argument("--learning_rate", type=float, help=f"transformer and heads; {PRESET_HELP} (r50: 1e-4)")
    train.add_argument("--backbone_learning_rate", type=float, help=f"0 freezes the backbone; {PRESET_HELP} (r50: 1e-5)")
    train.add_argument("--weight_decay", type=float, default=1e-4)
    train.add_argument("--max_grad_norm", type=float, default=0.1, help="gradient clipping; 0 disables")
    train.add_argument("--lr_drop_epochs", type=int, help=f"lr x0.1 every N epochs (StepLR), 0: never; {PRESET_HELP} (r50: 200)")
    train.add_argument("--warmup_steps", type=int, default=0, help="linear lr warmup (the original has none)")
    train.add_argument("--seed", type=int, default=42, help="each process uses seed + its rank")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="default: from accelerate launch/config")
    train.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    train.add_argument("--dataloader_num_workers", type=int, default=0)
    train.add_argument("--num_threads", type=threads_option,
                       help="torch CPU threads of each process: N, 0 (torch's default: all cores) or 'auto' (the idle "
                            f"cores, at most 4); {PRESET_HELP} (demo: auto)")

    run = p.add_argument_group("logging, evaluation, checkpoints")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--eval_every_epochs", type=int, default=1)
    run.add_argument("--checkpointing_steps", type=int, default=0, help="save every N optimizer steps (0: off)")
    run.add_argument("--checkpointing_epochs", type=int, default=1, help="save every N epochs (0: off)")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the newest K checkpoints")
    run.add_argument("--resume_from_checkpoint", help="'latest' (newest in output_dir; none yet = fresh start) or a folder")
    run.add_argument("--report_to", default="none", help="accelerate trackers: tensorboard, wandb, all, none")
    run.add_argument("--tracker_project_name", default="detr_custom")
    run.add_argument("--picture_images", type=int, default=4, help="validation images in detections.png (0: none)")
    run.add_argument("--dump_first_step", help="debugging: save the first step's loss and gradients to this file")
    run.add_argument("--debug", action="store_true",
                     help=f"show the traceback of an error, not only its one-line message (or set {DEBUG_ENV}=1)")
    hub = p.add_argument_group("Hub (the same code path as scripts/push_to_hub.py)")
    hub.add_argument("--push_to_hub", action="store_true", help="upload the final model folder with a model card")
    hub.add_argument("--hub_model_id", help="repo id, e.g. you/detr-shapes (required with --push_to_hub)")
    hub.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    return p


def load_options_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Options from a YAML/JSON mapping; keys may use - or _; unknown keys are an error."""
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
    known = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; valid: {sorted(known)}")
    return options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over ``--config`` file over defaults."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_options_file(first.config, parser))
    return parser.parse_args(argv)


def check_hub_options(args: argparse.Namespace) -> None:
    """Fail in seconds, not after training: a bad repo id, offline mode or no token."""
    if not getattr(args, "push_to_hub", False):
        return
    from modeling_detr_custom.hub import HubError, check_can_upload, check_repo_id

    if not args.hub_model_id:
        raise SystemExit("error: --push_to_hub needs --hub_model_id (e.g. you/detr-shapes)")
    try:
        check_repo_id(args.hub_model_id)
        check_can_upload()
    except (HubError, ValueError) as err:
        raise SystemExit(f"error: --push_to_hub: {err}") from None


def push_to_hub(args: argparse.Namespace) -> None:
    """Upload the saved output_dir from the main process only; the built folder is kept on failure."""
    from accelerate import PartialState

    from modeling_detr_custom.hub import HubError, push_model_folder

    if not PartialState().is_main_process:
        return
    try:
        folder = push_model_folder(args.output_dir, args.hub_model_id, private=args.hub_private_repo)
    except HubError as err:
        print(f"error: training finished and {args.output_dir} is saved, but the upload failed: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"pushed {folder} to {args.hub_model_id}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_hub_options(args)
    try:
        results = run_training(args)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.push_to_hub:
        push_to_hub(args)
    return results


if __name__ == "__main__":
    run_cli(main)
