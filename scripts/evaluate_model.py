"""COCO box AP of a saved detr-custom folder on a dataset split, on any number of processes.

    python scripts/evaluate_model.py --model outputs/demo                       # the synthetic shapes' val split
    python scripts/evaluate_model.py --model outputs/r50 --coco_dir /data/coco --split val
    accelerate launch --num_processes 4 scripts/evaluate_model.py --model ... --coco_dir ...

Writes ``eval_results.json`` into the model folder (or ``--output_file``; an existing file is refused without
``--overwrite_output_file``), the file `scripts/push_to_hub.py` reports in the model card, and prints it.
Predicted labels are mapped to the dataset's category ids with the mapping training saved in the config.
``--dtype bf16`` runs the model under bfloat16 autocast (a CPU with native bfloat16, AVX512-BF16 or AMX, or a GPU
with bf16; anything else is one line `error: ...` before any work); the results record ``dtype`` and accelerate's
``mixed_precision``.

Before any prediction the split goes through the data check training runs (modeling_detr_custom/data/inspection.py;
its report is logged): a dataset whose labels the model names otherwise (both lists are named), boxes in another
format than --box_format declares, or a split without any usable box (AP would mean nothing; --allow_empty_split
evaluates it anyway) is one line `error: ...`; images no resize can handle are skipped and counted, and images with
more boxes than the model's queries are a warning.
"""

from __future__ import annotations

import json
from typing import Any

from modeling_detr_custom.checks import check_not_model_file, reporting_write_errors, run_cli
from modeling_detr_custom.training import EvalArguments, evaluate_folder, parse_eval_args
from modeling_detr_custom.training.evaluation import results_path, write_results


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    return parse_eval_args(argv, description=__doc__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    path = results_path(args)  # refused before any work if it exists
    check_not_model_file(path)  # --output_file MODEL/config.json would break the model, overwrite or not
    result = evaluate_folder(args)
    from accelerate import PartialState

    if PartialState().is_main_process:
        with reporting_write_errors(path):  # a read-only folder or a full disk: one line naming the path
            write_results(result, path)
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
