"""Checkpoints: written atomically with `accelerator.save_state`, rotated, found again (``latest``), loaded with
this run's learning rates; and the refusal to start a new run over a previous one.

Layout: ``<output_dir>/checkpoints/checkpoint-<global step>/`` holds accelerate's state (model, optimizer, RNG
states of every process) and ``training_state.json`` (`TrainState`), written last.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..checks import WriteError, follow_umask, make_output_folder, read_json, refused_write
from ..folder_lock import is_main_rank
from ..outputs import ARGS_FILE, CHECKPOINT_PREFIX, CHECKPOINTS_DIR, RUN_FILES, TRAINING_STATE_FILE
from .arguments import OptionChange, TrainArguments, resume_changes

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved as JSON beside every checkpoint.

    Attributes:
        global_step: optimizer steps done.
        epoch: the current epoch (0-based); equals the number of finished epochs at epoch ends.
        batches_in_epoch: batches of ``epoch`` this process has consumed (skipped on resume).
        num_processes, total_batch_size: of the run that wrote it (an exact resume needs the same).
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    num_processes: int = 1
    total_batch_size: int = 0

    def save(self, folder: Path) -> None:
        (folder / TRAINING_STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> TrainState:
        return cls(**read_json(folder / TRAINING_STATE_FILE))


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with their training state) under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / TRAINING_STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``latest`` -> the newest complete checkpoint of ``output_dir`` (None if there is none yet);
    a folder -> itself, checked."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting from scratch",
                           output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint folder "
                         f"(no {TRAINING_STATE_FILE}); use 'latest' or a {CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}N folder")
    return path


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, total_limit: int | None,
                    saved: Path | None = None) -> Path:
    """`accelerator.save_state` into ``checkpoints/checkpoint-<step>``, atomically.

    Everything is written to a temporary folder that is renamed once complete, so a crash or a
    kill during saving never leaves a checkpoint that `latest` would pick; a failed write (a full disk) deletes it.
    Its files get the umask's permissions (safetensors writes 0600). Then only the newest ``total_limit``
    checkpoints are kept. Every process must call this.

    ``saved``: the checkpoint this run last wrote or resumed from. When it is this step's folder there is
    nothing to write (a step and an epoch checkpoint coincide); any other folder of that name is stale (left
    by the trajectory before a resume from an earlier step) and is replaced, never reused.
    """
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step}"
    if saved is not None and saved.resolve() == final.resolve():
        return final
    if (final / TRAINING_STATE_FILE).is_file() and accelerator.is_main_process:
        logger.warning("replacing %s, written before this run resumed from an earlier step", final)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        with writing("the checkpoint", final):  # inside the cleanup: a full disk is seen before space is freed
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                follow_umask(tmp)
                state.save(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    except BaseException:
        if accelerator.is_main_process:  # a partial checkpoint only takes the space a resume may need
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``total_limit``."""
    if not total_limit:
        return
    for old in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)


# Optimizer settings that come from this run's options; `load_state` would bring back the checkpoint's.
OPTIMIZER_OPTIONS = {"initial_lr": "learning rate", "weight_decay": "weight decay"}


def load_checkpoint(accelerator: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """`accelerator.load_state` of ``path``, then this run's learning rates and weight decay (each change logged),
    so that what training_args.json records is what is used. A checkpoint that does not load is one ValueError
    line."""
    wanted = [{key: group[key] for key in OPTIMIZER_OPTIONS} for group in optimizer.param_groups]
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, OSError, SafetensorError) as err:
        raise ValueError(f"--resume_from_checkpoint {path}: {checkpoint_problem(err)}") from None
    for group, settings in zip(optimizer.param_groups, wanted):
        for key, value in settings.items():
            if group[key] != value and accelerator.is_main_process:
                logger.warning("resuming with the %s of group %s changed: %g in the checkpoint, %g from now on",
                               OPTIMIZER_OPTIONS[key], group.get("name", "?"), group[key], value)
            group[key] = value
    check_rng_state(path, accelerator.process_index)


def checkpoint_problem(err: Exception) -> str:
    """What is wrong with a checkpoint, in one line; torch's own message lists every mismatched tensor."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    mismatch = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                    lines[0] if "parameter group" in lines[0] else None)
    if mismatch is None:
        return f"it cannot be loaded ({lines[0][:300]})"
    return (f"it does not fit this model and optimizer ({mismatch[:300]}); resume with the options of the run that "
            "wrote it (--model_config, --config_overrides, --backbone_learning_rate: see its training_args.json)")


def check_rng_state(path: Path, process_index: int) -> None:
    """Warn when this process's RNG state in ``path`` cannot be read: `load_state` then keeps the current RNG and
    says so only at INFO (hidden), and dropout draws differ from an uninterrupted run."""
    from accelerate.utils import RNG_STATE_NAME, load

    file = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        states = load(file)
        problem = None if {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states) else "keys missing"
    except Exception as err:  # noqa: BLE001 - whatever stops accelerate from reading it makes the resume inexact
        problem = f"{type(err).__name__}: {err}"
    if problem:
        logger.warning("the resume from %s is NOT exact: %s cannot be read (%s); the weights, optimizer, step and "
                       "data order are restored, but random draws (dropout) differ from an uninterrupted run",
                       path, file, problem)


def check_resume_options(args: TrainArguments, checkpoint: Path) -> list[OptionChange]:
    """Compare a resume's options with the training_args.json of the run that wrote ``checkpoint``
    (`arguments.resume_changes`): ValueError on a run-defining change, else the changes to log. A record that is
    missing or unreadable is a warning: nothing to compare with."""
    record = checkpoint.resolve().parent.parent / ARGS_FILE
    try:
        saved = read_json(record)
    except (OSError, ValueError) as err:
        problem = getattr(err, "strerror", None) or err
    else:
        problem = None if isinstance(saved, dict) else "it holds no mapping of options"
    if problem is not None:
        if is_main_rank():  # before logging is set up: every process would say it
            logger.warning("the options of this resume cannot be checked against its run's: %s (%s)", record, problem)
        return []
    return resume_changes(saved, args, str(record))


# ----------------------------------------------------------------------------- writes that fail (disk full, ...)

class RunWriteError(WriteError):
    """A file of the run could not be written (`checks.refused_write`): ``what`` (e.g. "the checkpoint"), the file,
    the OS reason with its errno name; `message` adds what is intact and how to go on."""

    def __init__(self, what: str, failure: WriteError) -> None:
        super().__init__(Path(failure.filename or failure.path), failure.code, failure.detail, what=what)

    @property
    def reason(self) -> str:
        if self.code is None:
            return self.detail
        return f"{os.strerror(self.code)} ({errno.errorcode.get(self.code, self.code)})"

    def remedy(self) -> str:
        if self.code in (errno.ENOSPC, errno.EDQUOT):
            return "free space"
        if self.code in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"make {self.path.parent} writable"
        return f"check the disk of {self.path.parent} (space, permissions)"

    def message(self, last_checkpoint: Path | None, finished: bool = False) -> str:
        """One line: what failed, why, what is intact and how to go on."""
        if last_checkpoint is None:
            return (f"{self}; no checkpoint is complete yet, so nothing of this run can be resumed; {self.remedy()} "
                    "and start it again with --overwrite_output_dir")
        if finished:
            return (f"{self}; training finished and its final state is the complete checkpoint {last_checkpoint}; "
                    f"{self.remedy()} and rerun with --resume_from_checkpoint latest to write the model and results "
                    "(no step is trained again)")
        return (f"{self}; the last complete checkpoint is {last_checkpoint}; {self.remedy()} and resume with "
                "--resume_from_checkpoint latest")


@contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn a write the OS refuses inside the block (`checks.refused_write`) into a `RunWriteError` naming ``what``
    and ``path`` (or the file the OSError names); anything else passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        failure = refused_write(err, path)
        if failure is None:
            raise
        raise RunWriteError(what, failure) from err


# ----------------------------------------------------------------------------- a previous run in output_dir


def previous_run_files(output_dir: str, resume: str | None, overwrite: bool) -> list[Path]:
    """The files of an earlier run in ``output_dir`` (created if needed) that this run will replace.

    [] for a new or unrelated folder and when resuming from one of its own checkpoints. Raises ValueError, before
    anything is written, when the folder holds an earlier run and ``overwrite`` (``--overwrite_output_dir``) is off.
    """
    folder = make_output_folder(output_dir, "--output_dir")
    found = [folder / name for name in RUN_FILES if (folder / name).exists()]
    if not found or resumes_own_checkpoint(resume, folder):
        return []
    if not overwrite:
        raise ValueError(f"--output_dir {folder} holds a previous run ({', '.join(p.name for p in found)}); "
                         "continue it with --resume_from_checkpoint latest, choose a new --output_dir, or pass "
                         "--overwrite_output_dir to replace it (nothing was written)")
    return found


def resumes_own_checkpoint(resume: str | None, output_dir: Path) -> bool:
    """True when ``--resume_from_checkpoint`` continues a run of ``output_dir``: latest, or one of its checkpoints."""
    if resume == "latest":
        return bool(list_checkpoints(output_dir))
    return bool(resume) and Path(resume).resolve().parent == (output_dir / CHECKPOINTS_DIR).resolve()


def delete_previous_run(accelerator: Any, output_dir: Path, files: Sequence[Path]) -> None:
    """``--overwrite_output_dir``: delete the earlier run's ``files`` before this run writes its own."""
    if accelerator.is_main_process:
        logger.warning("--overwrite_output_dir: deleting the previous run's %s in %s", [p.name for p in files],
                       output_dir)
        for path in files:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()
