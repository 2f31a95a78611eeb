#!/usr/bin/env python
"""Build the exact folder to upload from a trained model folder, check it loads, and push it to the Hub.

    python scripts/push_to_hub.py --model_dir outputs/detr-custom --repo_id you/detr-shapes
    python scripts/push_to_hub.py --model_dir outputs/detr-custom --repo_id you/detr-shapes --local_dir hub-folder

The folder holds model.safetensors, config.json (auto_map for AutoConfig, AutoModel,
AutoModelForObjectDetection), preprocessor_config.json (auto_map for AutoImageProcessor), the remote-code
files and README.md rendered from the package's hub/model_card.md. Before any upload it is loaded in a fresh
offline process
with trust_remote_code=True and must give the source model's outputs.

--local_dir alone builds and checks the folder there and stops (no network, no token); add --upload to push
that folder too. Without --local_dir the folder is built in <model_dir>-hub and uploaded.
Exit status: 0 on success, 1 when the model cannot be loaded or building/checking/uploading fails (the message
names the cause and the built folder is kept; the traceback with --debug or DETR_CUSTOM_DEBUG=1), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import sys

from modeling_detr_custom.checks import debug_requested
from modeling_detr_custom.hub import DEFAULT_LICENSE, HubError, check_repo_id, push_model_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; exits with status 2 (argparse) for a bad one, an invalid repo id included."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="folder saved by train.py (model + image processor)")
    p.add_argument("--repo_id", required=True, help="Hub model repo: name or namespace/name")
    p.add_argument("--local_dir", help="build the folder here and stop (no upload unless --upload)")
    p.add_argument("--upload", action="store_true", help="with --local_dir: upload the folder after building it")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit_message", help="message of the upload commit")
    p.add_argument("--metrics_file",
                   help="evaluation JSON (default: all_results.json or eval_results.json in model_dir)")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help=f"Hub license id for the card (default {DEFAULT_LICENSE})")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    try:
        check_repo_id(args.repo_id)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    upload = args.local_dir is None or args.upload
    try:
        folder = push_model_folder(args.model_dir, args.repo_id, local_dir=args.local_dir, private=args.private,
                                   commit_message=args.commit_message, metrics_file=args.metrics_file,
                                   upload=upload, token=args.token, license=args.license)
    except (HubError, ValueError) as err:
        if debug_requested(argv):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    if upload:
        print(f"Uploaded {folder} to https://huggingface.co/{args.repo_id}")
    else:
        print(f"Built and verified {folder} (not uploaded: --local_dir without --upload)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
