"""The names of what training and evaluation write into a run's output folder.

One home for these names: the training loop writes them, the standalone evaluation writes its results under
the same name as the loop's final evaluation, and the Hub folder builder reads them back for the model card.
"""

CHECKPOINTS_DIR = "checkpoints"  # checkpoints/checkpoint-<global step>/ (accelerate state + TRAINING_STATE_FILE)
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete
ARGS_FILE = "training_args.json"  # the options exactly as the run used them
METRICS_FILE = "metrics.jsonl"  # one JSON object per logging step / evaluation, appended across resumes
RESULTS_FILE = "all_results.json"  # train.py: final COCO metrics + run facts
EVAL_RESULTS_FILE = "eval_results.json"  # scripts/evaluate_model.py: COCO metrics of a saved model on one split
PICTURE_FILE = "detections.png"
CURVES_FILE = "training_curves.png"
# Written before training (and by scripts/inspect_data.py): sample training images with their boxes as stored, and as
# the model sees them after the train transforms. Not in RUN_FILES: they come from the data alone, every run rewrites
# them, so inspecting the data into a folder does not make it "a previous run" that train.py would refuse.
DATA_PICTURE_FILE = "data_samples.png"
TRAINING_INPUTS_PICTURE_FILE = "training_inputs.png"
LOGS_DIR = "logs"  # accelerate trackers (tensorboard, ...)
WEIGHTS_FILE = "model.safetensors"

# What a run leaves in its output folder: a new run into a folder holding any of them would mix two runs.
RUN_FILES = (CHECKPOINTS_DIR, ARGS_FILE, METRICS_FILE, RESULTS_FILE, WEIGHTS_FILE, PICTURE_FILE, CURVES_FILE, LOGS_DIR)
