"""Training and evaluation of detr-custom with accelerate: what `scripts/train.py` and `scripts/evaluate_model.py`
run. Never shipped: the remote-code files do not import it.

- `presets.py`: the demo / tiny / r50 model configs and their training recipes, as data;
- `arguments.py`: the typed options (HfArgumentParser) and their resolution against a preset;
- `factories.py`: data, loaders, model, optimizer and lr schedule from the options;
- `checkpoints.py`: atomic checkpoints, rotation, ``latest``, exact resume, a previous run's folder;
- `monitor.py`: the running loss read once per logging interval, divergence checks, signals, metrics.jsonl;
- `job.py`: everything a run works on, built once by `setup` (accelerator, data, model, loaders, EMA), and resume;
- `loop.py`: the fit loop, the epoch loop, DETR's training step, and `run_training` around them;
- `ema.py`: the moving average of the weights (``--ema_decay``);
- `evaluation.py`: COCO AP gathered across processes, the detections picture, a saved folder's evaluation.
"""

from .arguments import EvalArguments, TrainArguments, parse_eval_args, parse_train_args, resolve_options
from .checkpoints import TrainState, list_checkpoints, resolve_checkpoint, rotate_checkpoints, save_checkpoint
from .evaluation import evaluate_coco, evaluate_folder, gather_predictions, predict
from .factories import (
                        apply_config_overrides,
                        create_model,
                        lr_factor,
                        make_eval_dataloader,
                        make_optimizer,
                        param_groups,
)
from .loop import run_training
from .monitor import NonFiniteLossError
from .presets import MODEL_PRESETS, TRAINING_PRESETS

__all__ = [
    "EvalArguments", "TrainArguments", "parse_eval_args", "parse_train_args", "resolve_options", "TrainState",
    "list_checkpoints", "resolve_checkpoint", "rotate_checkpoints", "save_checkpoint", "evaluate_coco",
    "evaluate_folder", "gather_predictions", "predict", "apply_config_overrides", "create_model", "lr_factor",
    "make_eval_dataloader", "make_optimizer", "param_groups", "run_training",
    "NonFiniteLossError", "MODEL_PRESETS", "TRAINING_PRESETS",
]
