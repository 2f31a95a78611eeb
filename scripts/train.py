"""Train or fine-tune DETR (detr-custom) with accelerate, evaluate it with COCO AP, save a remote-code folder.

    # the built-in demo: synthetic shapes generated once, a CPU-sized DETR, about 7 minutes on 2 AVX-512 cores
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

Options can also come from a YAML or JSON file (`--config file.yaml`, keys = option names); the command line
wins over the file, the file over the defaults. Options left unset take the defaults of the `--model_config`
preset (`demo` without a dataset argument, else `r50`); training_args.json records what the run used.

A new run refuses an --output_dir that holds a previous run (resume it, or pass --overwrite_output_dir), and any
run refuses one that another run is using (the folder is held for the whole run). A resume refuses options that
change what the run is (data, model, EMA on/off: see its training_args.json) and logs the others it changes.
Errors in the options, the data or a checkpoint are one line `error: ...` (exit status 1); --debug or
DETR_CUSTOM_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Any

from modeling_detr_custom.checks import run_cli
from modeling_detr_custom.training import NonFiniteLossError, TrainArguments, parse_train_args, run_training


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    """Command line over ``--config`` file over defaults (preset defaults are filled in by the run)."""
    return parse_train_args(argv, description=__doc__)


def check_hub_options(args: TrainArguments) -> None:
    """Fail in seconds, not after training: a bad repo id, offline mode or no token."""
    if not args.push_to_hub:
        return
    from modeling_detr_custom.hub import HubError, check_can_upload, check_repo_id

    if not args.hub_model_id:
        raise SystemExit("error: --push_to_hub needs --hub_model_id (e.g. you/detr-shapes)")
    try:
        check_repo_id(args.hub_model_id)
        check_can_upload()
    except (HubError, ValueError) as err:
        raise SystemExit(f"error: --push_to_hub: {err}") from None


def push_to_hub(args: TrainArguments) -> None:
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
