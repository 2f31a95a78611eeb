"""The training run: `setup` builds the job once, `fit` runs the epochs, `train_one_epoch` the steps, and
`train_step` is DETR's step (forward, set loss, backward, clip, optimizer step).

Host syncs: a step's only device-to-host transfer is the Hungarian matcher's (one per step, in the loss). The loss
terms are read once per ``--logging_steps`` (`monitor.RunningLoss`); with fp16 mixed precision, the gradient
scaler's inf check adds one per step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor

from ..coco_metric import STAT_NAMES
from ..curves import plot_training_curves
from ..data import DetectionData, metric_references, without_image_decoding
from ..image_processing_detr_custom import DetrCustomImageProcessor
from ..outputs import ARGS_FILE, CURVES_FILE, LOGS_DIR, METRICS_FILE, PICTURE_FILE, RESULTS_FILE
from .arguments import TrainArguments, resolve_options
from .checkpoints import (
    TrainState,
    delete_previous_run,
    load_checkpoint,
    previous_run_files,
    resolve_checkpoint,
    save_checkpoint,
)
from .ema import ModelEMA
from .evaluation import evaluate_coco, save_detection_picture
from .factories import (
    create_model,
    first_rows,
    load_data,
    lr_factor,
    make_eval_dataloader,
    make_image_processor,
    make_optimizer,
    make_train_dataloader,
    set_learning_rates,
    split_names,
)
from .monitor import LossWatch, MetricsLogger, NonFiniteLossError, RunningLoss, StopRequest

logger = logging.getLogger(__name__)

# What loss_detr_custom's Hungarian matcher raises (a ValueError, inside the forward, before any loss exists)
# when the predictions are NaN or Inf: the same divergence as a non-finite loss.
MATCHER_NON_FINITE = "the matching cost is not finite"


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


def resolve_num_threads(setting: int | str, local_processes: int = 1) -> int:
    """Torch CPU threads for each of this machine's ``local_processes`` training processes.

    An integer is used as given (0: torch's default, every core). ``"auto"`` (the small presets) takes
    the cores idle right now (0.3 s of CPU usage) shared among the processes, at least 1 and at most 4:
    a demo step runs about 1.5x faster on both cores of an idle 2-core machine than on one, but several
    times slower when another job keeps one of them busy (BENCHMARKS.md).
    """
    if str(setting) != "auto":
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


def load_splits(args: TrainArguments, data: DetectionData) -> tuple[datasets.Dataset, datasets.Dataset | None,
                                                                       str, str | None]:
    """(train rows, eval rows or None, their split names), undecoded and cut to ``--max_*_samples``."""
    train_split, eval_split = split_names(args, data)
    train_ds = first_rows(without_image_decoding(data.dataset[train_split]), args.max_train_samples)
    eval_ds = None if eval_split is None else first_rows(without_image_decoding(data.dataset[eval_split]),
                                                          args.max_eval_samples)
    return train_ds, eval_ds, train_split, eval_split


def setup(args: TrainArguments) -> Job:
    """Accelerator, data, model, optimizer, loaders (prepared), resume. Every process calls it."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(resolve_num_threads(args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        logger.info("torch CPU threads per process: %d (--num_threads %s)", torch.get_num_threads(), args.num_threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, device_specific=True)  # seed + rank, like the original (DDP broadcasts rank 0's weights)
    with accelerator.main_process_first():  # builds the synthetic data and the datasets cache once
        data = load_data(args, args.contiguous_labels)
    for split, report in data.report.items():
        logger.info("data %s: %s", split, {k: v for k, v in report.items() if v})
    model = create_model(args, data)
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
    job.metrics = MetricsLogger(accelerator, output_dir)
    if args.ema_decay:
        job.ema = ModelEMA(accelerator.unwrap_model(model), args.ema_decay, args.ema_warmup_steps)
        accelerator.register_for_checkpointing(job.ema)  # saved and loaded with every checkpoint
    resume(job)
    return job


def resume(job: Job) -> None:
    """Load ``--resume_from_checkpoint`` (model, optimizer, RNG states, accelerate's step) and the state."""
    path = resolve_checkpoint(job.args.resume_from_checkpoint, job.output_dir)
    if path is None:
        return
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


# ----------------------------------------------------------------------------- one step


def forward_loss(job: Job, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, loss terms) of the training forward. Predictions the matcher refuses as non-finite give a
    NaN loss and no terms: the run stops at the next read, on the non-finite-loss path."""
    try:
        outputs = job.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
    except ValueError as err:
        if MATCHER_NON_FINITE not in str(err):
            raise
        return torch.tensor(float("nan"), device=job.accelerator.device), {}
    return outputs.loss, outputs.loss_dict


def train_step(job: Job, batch: Mapping[str, Any]) -> None:
    """One micro-batch: forward + set loss, backward, and at the end of an accumulation clip and optimizer step.

    Reads nothing back from the device (the matcher's transfer inside the loss is the step's one sync); the loss
    terms go to ``job.running``.
    """
    acc, model, args = job.accelerator, job.model, job.args
    with acc.accumulate(model):
        model.train()
        loss, loss_dict = forward_loss(job, batch)
        job.running.add(loss, loss_dict, len(batch["labels"]), job.state.global_step + 1, job.state.epoch)
        if not loss_dict:  # diverged (weights are shared, so on every process): nothing to learn from
            return
        acc.backward(loss)
        if acc.sync_gradients:
            if args.dump_first_step and job.state.global_step == 0:
                dump_first_step(job, batch, loss, loss_dict)
            if args.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            set_learning_rates(job.optimizer, lr_factor(job.state.global_step, job.state.epoch, args.lr_drop_epochs,
                                                        args.warmup_steps))
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        if job.ema is not None and acc.sync_gradients:
            job.ema.update(acc.unwrap_model(model))


def dump_first_step(job: Job, batch: Mapping[str, Any], loss: Tensor, loss_dict: Mapping[str, Tensor]) -> None:
    """Save the first step's loss (mean over processes) and gradients (after DDP's all-reduce, before
    clipping) to ``--dump_first_step``: the distributed-equivalence test compares them. Debugging: syncs."""
    from accelerate.utils import gather_object

    acc = job.accelerator
    mean_loss = float(acc.reduce(loss.detach().float().clone(), reduction="sum")) / acc.num_processes
    image_ids = gather_object([int(t["image_id"]) for t in batch["labels"]])
    if acc.is_main_process:
        model = acc.unwrap_model(job.model)
        grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss, "grads": grads, "image_ids": image_ids, "num_processes": acc.num_processes,
                    "loss_dict": {k: float(v) for k, v in loss_dict.items()}}, job.args.dump_first_step)


# ----------------------------------------------------------------------------- reads, evaluation, checkpoints


def read_running(job: Job, stop: StopRequest, log: bool) -> bool:
    """The interval's one host read: stop on a non-finite loss, warn on a blow-up, log when ``log``.

    Returns whether any process asked to stop (SIGTERM/SIGINT). Every process calls it at the same steps.
    """
    reading = job.running.read(job.accelerator, stop.signum is not None)
    warning = job.watch.check(reading, job.running, job.last_checkpoint)
    if warning:
        if job.accelerator.is_main_process:
            logger.warning("%s", warning)
        job.metrics.log({"event": "loss_blowup", "message": warning}, reading.step_losses[-1][0])
    if log and reading.micro_steps:
        elapsed = time.perf_counter() - job.running.start
        metrics = {f"train_{k}": v for k, v in reading.terms.items()}
        metrics.update({"epoch": job.state.epoch, "lr": job.optimizer.param_groups[0]["lr"],
                        "images_per_s": reading.samples / max(elapsed, 1e-9)})
        if len(job.optimizer.param_groups) > 1:
            metrics["lr_backbone"] = job.optimizer.param_groups[1]["lr"]
        job.metrics.log(metrics, job.state.global_step)
        mean_loss = sum(loss for _, _, loss in reading.step_losses) / max(len(reading.step_losses), 1)
        job.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['lr']:.2e}", epoch=job.state.epoch)
        job.running.reset()
    return reading.stop


def evaluated_model(job: Job) -> torch.nn.Module:
    """The weights that are evaluated, saved and shipped: the EMA with ``--ema_decay``, else the trained ones."""
    return job.ema.module if job.ema is not None else job.model


def evaluate(job: Job, final: bool = False) -> dict[str, float] | None:
    """COCO AP on the eval split (every ``--eval_every_epochs`` epochs, and at the end)."""
    if job.eval_loader is None or job.references is None:
        return None
    if final and job.last_eval_step == job.state.global_step:
        return job.last_eval
    start = time.perf_counter()
    result = evaluate_coco(evaluated_model(job), job.eval_loader, job.processor, job.accelerator, job.references,
                           job.label_to_category_id, job.args.coco_eval_backend)
    job.last_eval, job.last_eval_step = result, job.state.global_step
    metrics = {f"eval_{k}": v for k, v in result.items()}
    metrics.update({"epoch": job.state.epoch, "eval_runtime_s": time.perf_counter() - start,
                    "elapsed_s": time.perf_counter() - job.started})
    job.metrics.log(metrics, job.state.global_step)
    logger.info("step %d eval: AP %.3f AP50 %.3f AP75 %.3f (%d images)", job.state.global_step, result["AP"],
                result["AP50"], result["AP75"], result["num_images"])
    return result


def save_job_checkpoint(job: Job) -> None:
    """`save_checkpoint` of the job's current state (once per step); it becomes ``job.last_checkpoint``."""
    job.last_checkpoint = save_checkpoint(job.accelerator, job.output_dir, job.state, job.args.checkpoints_total_limit,
                                          job.last_checkpoint)


# ----------------------------------------------------------------------------- epochs


def epoch_loader(job: Job, epoch: int) -> Any:
    """The training loader of ``epoch``, its first batches skipped when resuming inside it."""
    loader = job.train_loader
    loader.set_epoch(epoch)  # sampler order = f(seed, epoch)
    loader.collate_fn.set_epoch(epoch)  # augmentation = f(seed, epoch, image id)
    skip = job.state.batches_in_epoch if epoch == job.state.epoch else 0
    if skip:
        loader = job.accelerator.skip_first_batches(loader, skip)
        loader.set_epoch(epoch)
    return loader


def after_step(job: Job, stop: StopRequest) -> bool:
    """Logging and step checkpoints after optimizer step ``global_step``; True when a signal asks to stop (the
    checkpoint is then written). Reads the device only at logging and checkpoint steps."""
    step, args = job.state.global_step, job.args
    log_now = step % args.logging_steps == 0
    save_now = bool(args.checkpointing_steps) and step % args.checkpointing_steps == 0
    if not (log_now or save_now):
        return False
    stop_now = read_running(job, stop, log=log_now)  # a NaN state raises here, before it can be saved
    if save_now or stop_now:
        save_job_checkpoint(job)
    return stop_now


def train_one_epoch(job: Job, stop: StopRequest) -> bool:
    """The steps of ``job.state.epoch`` (from where a resume left off); True when stopped by a signal."""
    state = job.state
    for batch in epoch_loader(job, state.epoch):
        train_step(job, batch)
        state.batches_in_epoch += 1
        if not job.accelerator.sync_gradients:
            continue
        state.global_step += 1
        job.progress.update(1)
        if after_step(job, stop):
            return True
        if state.global_step >= job.max_steps:
            break
    return False


def end_of_epoch(job: Job, stop: StopRequest) -> None:
    """Evaluation and the epoch checkpoint when due, after a read that refuses a non-finite state."""
    state, args = job.state, job.args
    finished = state.epoch + 1
    evaluate_now = finished % args.eval_every_epochs == 0 and state.global_step < job.max_steps
    save_now = bool(args.checkpointing_epochs) and finished % args.checkpointing_epochs == 0
    if evaluate_now or save_now:
        read_running(job, stop, log=False)
    if evaluate_now:
        evaluate(job)
    if save_now:
        save_job_checkpoint(job)
    state.epoch, state.batches_in_epoch = finished, 0


def fit(job: Job, stop: StopRequest) -> int | None:
    """Run until ``max_steps``; returns the signal number if stopped by a signal (after a checkpoint)."""
    from tqdm.auto import tqdm

    job.progress = tqdm(total=job.max_steps, initial=job.state.global_step, desc="train", dynamic_ncols=True,
                        disable=not job.accelerator.is_local_main_process)
    job.running.reset()  # the first interval's throughput starts now, not at setup
    try:
        while job.state.global_step < job.max_steps:
            if train_one_epoch(job, stop):
                return stop.signum or signal.SIGTERM
            if job.state.batches_in_epoch >= len(job.train_loader):  # a full epoch: its end-of-epoch work
                end_of_epoch(job, stop)
    finally:
        job.progress.close()
    read_running(job, stop, log=bool(job.running.losses))
    save_job_checkpoint(job)  # the final state, so `--resume_from_checkpoint latest --max_steps M` can continue
    return None


# ----------------------------------------------------------------------------- the run


def save_final(job: Job, eval_result: dict[str, float] | None, runtime: float) -> dict[str, Any]:
    """Model + processor (remote code) into ``output_dir``, ``all_results.json``, the pictures."""
    acc, args = job.accelerator, job.args
    acc.wait_for_everyone()
    results: dict[str, Any] = {k: (eval_result or {}).get(k, float("nan")) for k in STAT_NAMES}
    results.update({
        "eval_num_images": (eval_result or {}).get("num_images", 0), "eval_split": job.eval_split,
        "global_step": job.state.global_step, "epoch": job.state.epoch, "num_processes": acc.num_processes,
        "total_train_batch_size": job.state.total_batch_size, "train_runtime_s": round(runtime, 2),
        "mixed_precision": acc.mixed_precision, "model_config": args.model_config,
        "ema": job.ema is not None, "ema_decay": args.ema_decay,
    })
    if acc.is_main_process:
        model = acc.unwrap_model(evaluated_model(job))
        model.save_pretrained(job.output_dir)
        type(job.processor).register_for_auto_class("AutoImageProcessor")
        job.processor.save_pretrained(job.output_dir)
        (job.output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        if job.eval_dataset is not None and args.picture_images > 0:
            save_detection_picture(model, job.processor, job.eval_dataset, job.output_dir / PICTURE_FILE,
                                   args.picture_images)
        plot_training_curves(job.output_dir / METRICS_FILE, job.output_dir / CURVES_FILE,
                             title=f"{job.output_dir.name} ({args.model_config})")
    acc.wait_for_everyone()
    return results


def options_record(args: TrainArguments) -> dict[str, Any]:
    """``training_args.json``: the resolved options, exactly as the run uses them."""
    return dataclasses.asdict(args)


def start(job: Job) -> None:
    """Record the options, log the plan, start the trackers."""
    acc, args = job.accelerator, job.args
    if acc.is_main_process:
        (job.output_dir / ARGS_FILE).write_text(json.dumps(options_record(args), indent=2, default=str))
        logger.info("%d process(es) on %s, mixed precision %s; %d steps (%d per epoch, %d epochs); total batch %d",
                    acc.num_processes, acc.device, acc.mixed_precision, job.max_steps, job.steps_per_epoch,
                    math.ceil(job.max_steps / job.steps_per_epoch), job.state.total_batch_size)
    if args.report_to not in (None, "none"):
        tracker_config = {k: v for k, v in options_record(args).items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers(args.tracker_project_name, config=tracker_config)


def run_training(args: TrainArguments) -> dict[str, Any]:
    """The whole job; returns the final results (``all_results.json``).

    Raises NonFiniteLossError when the loss stops being finite; exits via SystemExit(128 + signal)
    after checkpointing when SIGTERM/SIGINT arrive.
    """
    args = resolve_options(args)
    previous = previous_run_files(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    job = setup(args)
    if previous:
        delete_previous_run(job.accelerator, job.output_dir, previous)
    start(job)
    stop = StopRequest().install()
    began = time.perf_counter()
    try:
        signum = fit(job, stop)
    except NonFiniteLossError as err:
        job.metrics.log({"event": "non_finite_loss", "message": str(err)}, job.state.global_step)
        job.accelerator.end_training()
        raise
    finally:
        stop.restore()
    if signum is not None:
        job.accelerator.end_training()
        logger.warning("stopped by %s at step %d; checkpoint %s; continue with --resume_from_checkpoint latest",
                       signal.Signals(signum).name, job.state.global_step, job.last_checkpoint)
        raise SystemExit(128 + int(signum))
    results = save_final(job, evaluate(job, final=True), time.perf_counter() - began)
    job.accelerator.end_training()
    if job.accelerator.is_main_process:
        logger.info("saved the model to %s; results: %s", job.output_dir,
                    {k: results[k] for k in ("AP", "AP50", "AP75", "global_step", "num_processes")})
    return results
