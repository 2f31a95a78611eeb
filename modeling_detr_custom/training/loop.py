"""The training run: `fit` runs the epochs, `train_one_epoch` the steps, `train_step` is DETR's step (forward,
set loss, backward, clip, optimizer step); `run_training` is the whole job around them (`job.setup` builds it).

Host syncs: a step's only device-to-host transfer is the Hungarian matcher's (one per step, in the loss). The loss
terms are read once per ``--logging_steps`` (`monitor.RunningLoss`); with fp16 mixed precision, the gradient
scaler's inf check adds one per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checks import follow_umask, make_output_folder
from ..coco_metric import STAT_NAMES
from ..curves import plot_training_curves
from ..folder_lock import hold_folder, is_main_rank
from ..outputs import ARGS_FILE, CURVES_FILE, METRICS_FILE, PICTURE_FILE, RESULTS_FILE, WEIGHTS_FILE
from .arguments import OptionChange, TrainArguments, options_json, resolve_options
from .checkpoints import (
    RunWriteError,
    check_resume_options,
    checkpoint_step,
    delete_previous_run,
    previous_run_files,
    resolve_checkpoint,
    save_checkpoint,
    writing,
)
from .evaluation import evaluate_coco, save_detection_picture
from .factories import lr_factor, set_learning_rates
from .job import Job, setup
from .monitor import NonFiniteLossError, StopRequest

logger = logging.getLogger(__name__)

# What loss_detr_custom's Hungarian matcher raises (a ValueError, inside the forward, before any loss exists)
# when the predictions are NaN or Inf: the same divergence as a non-finite loss.
MATCHER_NON_FINITE = "the matching cost is not finite"


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
        if not model.training:  # after an evaluation; `train()` walks every module, 2 % of a demo step
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
    """`save_checkpoint` of the job's current state (once per step); it becomes ``job.last_checkpoint``. A write the
    OS refuses is a `checkpoints.RunWriteError`."""
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
        out = job.output_dir
        with writing("the final model", out / WEIGHTS_FILE):
            model.save_pretrained(out)
            follow_umask(*out.glob("model*.safetensors"))  # safetensors writes 0600: readable as any file of the run
        type(job.processor).register_for_auto_class("AutoImageProcessor")
        with writing("the image processor", out):
            job.processor.save_pretrained(out)
        with writing("the results", out / RESULTS_FILE):
            write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=2))
        if job.eval_dataset is not None and args.picture_images > 0:
            with writing("the detections picture", out / PICTURE_FILE):
                save_detection_picture(model, job.processor, job.eval_dataset, out / PICTURE_FILE,
                                       args.picture_images)
        with writing("the training curves", out / CURVES_FILE):
            plot_training_curves(out / METRICS_FILE, out / CURVES_FILE, title=f"{out.name} ({args.model_config})")
    acc.wait_for_everyone()
    return results


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part: written beside it, then renamed. The run holds
    its folder (`folder_lock`), so one fixed temporary name is enough."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def options_record(args: TrainArguments) -> dict[str, Any]:
    """``training_args.json``: the resolved options, exactly as the run uses them."""
    return options_json(args)


def start(job: Job) -> None:
    """Record the options, log the plan, start the trackers."""
    acc, args = job.accelerator, job.args
    if acc.is_main_process:
        with writing("the options record", job.output_dir / ARGS_FILE):  # a resume keeps the old one on failure
            write_text_atomic(job.output_dir / ARGS_FILE, json.dumps(options_record(args), indent=2))
        logger.info("%d process(es) on %s, mixed precision %s; %d steps (%d per epoch, %d epochs); total batch %d",
                    acc.num_processes, acc.device, acc.mixed_precision, job.max_steps, job.steps_per_epoch,
                    math.ceil(job.max_steps / job.steps_per_epoch), job.state.total_batch_size)
    if args.report_to not in (None, "none"):
        tracker_config = {k: v for k, v in options_record(args).items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers(args.tracker_project_name, config=tracker_config)


def run_training(args: TrainArguments) -> dict[str, Any]:
    """The whole job; returns the final results (``all_results.json``).

    The run holds its output folder throughout (`folder_lock.hold_folder`, the main process): a second run into it
    is refused before it looks at the folder, so two runs started together cannot both find it free.

    Raises NonFiniteLossError when the loss stops being finite; exits via SystemExit(128 + signal)
    after checkpointing when SIGTERM/SIGINT arrive. A write the OS refuses (a full disk) is one ValueError line
    saying what is intact.
    """
    args = resolve_options(args)
    folder = make_output_folder(args.output_dir, "--output_dir")
    with hold_folder(folder, "train.py", enabled=is_main_rank()):
        return run_in_held_folder(args)


def run_in_held_folder(args: TrainArguments) -> dict[str, Any]:
    """`run_training` once the output folder is held: a previous run, the resume's options, setup, fit, save."""
    previous = previous_run_files(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    changes = check_resume_options(args, checkpoint) if checkpoint is not None else []
    job = setup(args, checkpoint)
    log_option_changes(job, changes)
    if previous:
        delete_previous_run(job.accelerator, job.output_dir, previous)
    try:
        start(job)
        return train_and_save(job)
    except RunWriteError as err:
        job.accelerator.end_training()
        last = job.last_checkpoint
        finished = last is not None and checkpoint_step(last) == job.state.global_step >= job.max_steps
        raise ValueError(err.message(last, finished)) from err


def log_option_changes(job: Job, changes: list[OptionChange]) -> None:
    """The options a resume changed, as training_args.json will now record them: trajectory changes as a WARNING."""
    if not changes or not job.accelerator.is_main_process:
        return
    warned = [str(c) for c in changes if c.warn]
    if warned:
        logger.warning("resuming at step %d with options changed from the run's (used from this step on and recorded "
                       "in %s): %s", job.state.global_step, ARGS_FILE, ", ".join(warned))
    others = [str(c) for c in changes if not c.warn]
    if others:
        logger.info("resuming with settings changed from the run's: %s", ", ".join(others))


def train_and_save(job: Job) -> dict[str, Any]:
    """Fit, then the final evaluation and save."""
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
