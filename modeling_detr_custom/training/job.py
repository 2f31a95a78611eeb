"""The job a training run works on: `setup` builds it once on every process (accelerator, data, model,
optimizer, prepared loaders, EMA) and `resume` restores a checkpoint into it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from ..data import DetectionData, metric_references, without_image_decoding
from ..image_processing_detr_custom import DetrCustomImageProcessor
from ..outputs import LOGS_DIR
from .arguments import TrainArguments
from .checkpoints import TrainState, load_checkpoint, writing
from .data_check import check_training_data
from .ema import ModelEMA
from .factories import (
    create_model,
    first_rows,
    load_data,
    make_eval_dataloader,
    make_image_processor,
    make_optimizer,
    make_train_dataloader,
    split_names,
)
from .monitor import LossWatch, MetricsLogger, RunningLoss

logger = logging.getLogger(__name__)


class RunMetrics(MetricsLogger):
    """`MetricsLogger` whose failed writes (a full disk) are one `checkpoints.RunWriteError` naming metrics.jsonl."""

    def log(self, metrics: Any, step: int) -> None:
        with writing("the metrics", self.path):
            super().log(metrics, step)


@dataclass
class Job:
    """Everything the loop needs, built once by `setup`; ``state`` and the monitors change as it runs."""

    args: TrainArguments
    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module  # prepared (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    train_loader: Any  # prepared torch DataLoader
    eval_loader: Any | None
    processor: DetrCustomImageProcessor
    eval_dataset: datasets.Dataset | None  # undecoded rows
    eval_split: str | None
    references: list[dict] | None  # per-image ground truth for the metric (dataset category ids)
    label_to_category_id: dict[int, int]
    output_dir: Path
    steps_per_epoch: int
    max_steps: int
    state: TrainState = field(default_factory=TrainState)
    metrics: MetricsLogger | None = None
    running: RunningLoss = field(default_factory=RunningLoss)
    watch: LossWatch = field(default_factory=LossWatch)
    ema: ModelEMA | None = None  # --ema_decay: the averaged weights, which evaluation and the saved model use
    progress: Any = None  # tqdm
    last_eval: dict[str, float] | None = None
    last_eval_step: int = -1
    last_checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)


# ----------------------------------------------------------------------------- setup


def make_accelerator(args: TrainArguments) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    return Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / LOGS_DIR)),
        # our sampler is seeded by (seed, epoch) already; accelerate must not replace it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        # the only buffers are frozen BatchNorm statistics and loss weights: nothing to re-broadcast each step
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        cpu=args.cpu)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# `--num_threads auto`: the machine's load, read as the quietest of a few samples (0.6 s at start-up in all).
IDLE_SAMPLES, IDLE_SAMPLE_S = 3, 0.2


def resolve_num_threads(setting: int | str, local_processes: int = 1) -> int:
    """Torch CPU threads for each of this machine's ``local_processes`` training processes.

    An integer is used as given (0: torch's default, every core). ``"auto"`` (the small presets) takes
    the cores idle right now shared among the processes, at least 1 and at most 4: a demo step runs about
    1.5x faster on both cores of an idle 2-core machine than on one, but several times slower when another
    job keeps one of them busy (BENCHMARKS.md). "Idle" is the quietest of `IDLE_SAMPLES` short samples, so a
    blip of another process (a shell, a finishing job) does not cost the whole run a core, while a job that
    keeps a core busy shows in every sample.
    """
    if str(setting) != "auto":
        return int(setting) or torch.get_num_threads()
    import psutil  # accelerate's dependency

    busy = min(psutil.cpu_percent(interval=IDLE_SAMPLE_S) for _ in range(IDLE_SAMPLES))
    return threads_for_idle_cores(usable_cores() * (1 - busy / 100), local_processes)


def threads_for_idle_cores(idle: float, local_processes: int = 1) -> int:
    """`--num_threads auto`'s share of ``idle`` cores for each of ``local_processes``: at least 1, at most 4."""
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


def load_splits(args: TrainArguments, data: DetectionData) -> tuple[datasets.Dataset, datasets.Dataset | None,
                                                                       str, str | None]:
    """(train rows, eval rows or None, their split names), undecoded and cut to ``--max_*_samples``."""
    train_split, eval_split = split_names(args, data)
    train_ds = first_rows(without_image_decoding(data.dataset[train_split]), args.max_train_samples)
    eval_ds = None if eval_split is None else first_rows(without_image_decoding(data.dataset[eval_split]),
                                                          args.max_eval_samples)
    return train_ds, eval_ds, train_split, eval_split


def setup(args: TrainArguments, checkpoint: Path | None = None) -> Job:
    """Accelerator, data, model, optimizer, loaders (prepared), and the resume from ``checkpoint`` (the resolved
    ``--resume_from_checkpoint``; None: a fresh start). Every process calls it."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(resolve_num_threads(args.num_threads, local))
        fewer = args.num_threads == "auto" and torch.get_num_threads() < threads_for_idle_cores(usable_cores(), local)
        logger.info("torch CPU threads per process: %d (--num_threads %s%s)", torch.get_num_threads(), args.num_threads,
                    ": other processes kept cores busy at start-up; --num_threads N chooses" if fewer else "")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, device_specific=True)  # seed + rank, like the original (DDP broadcasts rank 0's weights)
    with accelerator.main_process_first():  # builds the synthetic data and the datasets cache once
        data = load_data(args, args.contiguous_labels)
    # the one data check (data/inspection.py) before the model is built or any step runs; pictures from the main process
    data, _ = check_training_data(args, data, write_pictures=accelerator.is_main_process)
    model = create_model(args, data, resuming=checkpoint is not None)
    processor = make_image_processor(args)
    train_ds, eval_ds, train_split, eval_split = load_splits(args, data)
    train_loader = make_train_dataloader(args, train_ds, processor, train_split)
    model, optimizer, train_loader = accelerator.prepare(model, make_optimizer(model, args), train_loader)
    eval_loader = None if eval_ds is None else accelerator.prepare(
        make_eval_dataloader(eval_ds, processor, args.per_device_eval_batch_size, args.dataloader_num_workers))
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError(f"no full training batch: {len(train_loader.dataset)} images for a total batch of "
                         f"{args.per_device_train_batch_size * accelerator.num_processes}")
    mapping = dict(data.label_mapping.label_to_category_id)
    # ground truth with dataset category ids; predictions are mapped to them with the same mapping
    references = metric_references(eval_ds, mapping) if eval_ds is not None else None
    job = Job(args, accelerator, model, optimizer, train_loader, eval_loader, processor, eval_ds, eval_split,
              references, mapping, output_dir, steps_per_epoch,
              args.max_steps or args.num_train_epochs * steps_per_epoch)
    job.state.num_processes = accelerator.num_processes
    job.state.total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * \
        args.gradient_accumulation_steps
    job.metrics = RunMetrics(accelerator, output_dir)
    if args.ema_decay:
        job.ema = ModelEMA(accelerator.unwrap_model(model), args.ema_decay, args.ema_warmup_steps)
        accelerator.register_for_checkpointing(job.ema)  # saved and loaded with every checkpoint
    if checkpoint is not None:
        resume(job, checkpoint)
    return job


def resume(job: Job, path: Path) -> None:
    """Load the checkpoint ``path`` (model, optimizer, RNG states, accelerate's step) and the state."""
    load_checkpoint(job.accelerator, job.optimizer, path)
    saved = TrainState.load(path)
    if (saved.num_processes, saved.total_batch_size) != (job.state.num_processes, job.state.total_batch_size):
        logger.warning("resuming a run of %d process(es), total batch %d, with %d, %d: the data order and "
                       "the steps differ from an uninterrupted run", saved.num_processes, saved.total_batch_size,
                       job.state.num_processes, job.state.total_batch_size)
    state = job.state
    state.global_step, state.epoch, state.batches_in_epoch = saved.global_step, saved.epoch, saved.batches_in_epoch
    if state.batches_in_epoch >= len(job.train_loader):  # saved at an epoch end
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    job.last_checkpoint = path
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.global_step, state.epoch,
                state.batches_in_epoch)
