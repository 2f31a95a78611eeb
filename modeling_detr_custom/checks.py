"""Checks shared by the tools (train, evaluate, predict, push_to_hub): input files, output folders, saved
weights and model outputs, and the one-line error report of the scripts.

Not remote code: nothing in the model, config, loss or processor files imports this module.

Every check raises ValueError with one line naming the file or value and what was expected, so that
`run_cli` can print it as ``error: ...`` (the traceback only with ``DETR_CUSTOM_DEBUG=1`` or ``--debug``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

logger = logging.getLogger(__name__)

DEBUG_ENV = "DETR_CUSTOM_DEBUG"
WEIGHTS_FILE = "model.safetensors"


def read_json(path: str | os.PathLike, data: bytes | str | None = None) -> Any:
    """The parsed JSON of the file ``path`` (or of ``data``, its contents already read); ValueError naming the
    file and the position of a syntax error."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes() if data is None else data)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a JSON text file: {err.reason} at byte {err.start}") from None


def make_output_folder(path: str | os.PathLike, option: str) -> Path:
    """Create the folder ``path`` (and its parents) for the option named ``option``; returns it.

    Raises ValueError when ``path`` or one of its parents is a regular file, or the folder cannot be created.
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{option} {path}: {blocker} is a file, not a folder; choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {path} cannot be created: {err.strerror or err}") from None
    return path


# The files a saved model folder is made of (a folder holding config.json): its config, processor config, model card,
# generation config, weights (.safetensors, sharded ones' index, .bin) and remote code (.py).
MODEL_FOLDER_FILES = ("config.json", "preprocessor_config.json", "generation_config.json", "README.md",
                      "model.safetensors.index.json")
MODEL_FOLDER_SUFFIXES = (".safetensors", ".bin", ".py")


def check_not_model_file(path: str | os.PathLike) -> None:
    """Raise ValueError when writing ``path`` would replace a file of a saved model folder: the folder would no
    longer load as its model. No overwrite option lifts this; the message names the file."""
    path = Path(path).expanduser().resolve()  # a link to a model's file is that file
    own = path.name in MODEL_FOLDER_FILES or path.suffix in MODEL_FOLDER_SUFFIXES
    if own and path.is_file() and (path.parent / "config.json").is_file():
        raise ValueError(f"{path} is a file of the model folder {path.parent} and is never overwritten; "
                         "choose another output name or folder")


# ----------------------------------------------------------------------------- writes the OS refuses

# What torch.save (its zip writer) and safetensors say when the OS refuses a write; torch's says no errno.
WRITE_FAILURE_MARKERS = ("unexpected pos", "basic_ios::clear", "file write failed", "PytorchStreamWriter failed",
                         "No space left", "Disk quota exceeded", "Read-only file system", "Permission denied")
MESSAGE_ERRNOS = {"No space left": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                  "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}
LOW_SPACE_BYTES = 1 << 20  # less than this free where a write failed: the disk is full


class WriteError(ValueError):
    """A write the OS refused, as the one line ``cannot write [<what> ]<path>: <reason>`` that `run_cli` prints.

    ``path``: what the tool was writing; ``code``: the errno, None when unknown (torch's zip writer names none);
    ``detail``: the OS's words (or the library's, for an unknown errno); ``filename``: the file the OS named.
    """

    def __init__(self, path: str | os.PathLike, code: int | None, detail: str, what: str = "",
                 filename: Any = None) -> None:
        self.path, self.code, self.detail, self.what, self.filename = Path(path), code, detail, what, filename
        self.shown = str(path)  # as the user gave it
        super().__init__(f"cannot write {what + ' ' if what else ''}{self.shown}: {self.reason}")

    @property
    def reason(self) -> str:
        """The OS's words, and the file it named when that is not the path written."""
        other = self.filename and str(self.filename) != self.shown
        return f"{self.detail} ({self.filename})" if other else self.detail


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and what caused it (``raise ... from`` or raised while handling), outermost first."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def refused_write(err: BaseException, path: str | os.PathLike) -> WriteError | None:
    """``err``, raised writing ``path``, as a `WriteError` when the OS refused the write: an OSError with an errno
    in its chain, or torch's or safetensors' words for one (`library_write_failure`); else None (maybe a bug)."""
    chain = exception_chain(err)
    cause = next((c for c in chain if isinstance(c, OSError) and c.errno), None)
    if cause is not None:
        return WriteError(path, cause.errno, cause.strerror or str(cause), filename=cause.filename)
    if isinstance(err, (RuntimeError, SafetensorError)):
        return library_write_failure(" | ".join(" ".join(str(c).split()) for c in chain), path)
    return None


def library_write_failure(text: str, path: str | os.PathLike) -> WriteError | None:
    """The `WriteError` that torch's or safetensors' message ``text`` reports, else None. The errno is safetensors'
    ``IoError(Os { code: 28, ... })`` or the OS's words; torch's zip writer gives neither, so little free space
    where it wrote means a full disk."""
    if not (any(m in text for m in WRITE_FAILURE_MARKERS) or "IoError" in text):
        return None
    found = re.search(r"\bcode: (\d+)", text)
    code = int(found.group(1)) if found else next((c for m, c in MESSAGE_ERRNOS.items() if m in text), None)
    if code is None and free_bytes(Path(path)) < LOW_SPACE_BYTES:
        code = errno.ENOSPC
    return WriteError(path, code, f"the write failed ({text[:200]})" if code is None else os.strerror(code))


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the file system of ``path`` (its nearest existing folder); large if unknown."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                break
    return 1 << 62


@contextmanager
def reporting_write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Run a tool's own writes to ``target``: a write the OS refuses there (read-only folder, permission denied,
    disk full; also as torch's or safetensors' message, `refused_write`) becomes a one-line `WriteError` naming the
    path and the OS reason; any OSError there does, in its own words. Only writes are wrapped: an error anywhere
    else keeps its traceback, as it may be a bug rather than the user's environment."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        failure = refused_write(err, target)
        if failure is None and isinstance(err, OSError):  # no errno: still the environment's
            failure = WriteError(target, None, err.strerror or str(err), filename=err.filename)
        if failure is None:
            raise
        raise failure from err


def _weights_name(source: str) -> str:
    """The weights file of a local folder, else the source itself (a Hub repo id)."""
    return str(Path(source) / WEIGHTS_FILE) if Path(source).is_dir() else source


def load_checked(model_class: Any, source: str | os.PathLike, allow_missing: bool = False, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(source, **kwargs)``, refusing weights that would give a wrong model.

    Raises ValueError naming the file when the weights file is corrupt or truncated, when parameters are
    missing from it (they would be random; only logged with ``allow_missing``, for fine-tuning with new
    layers), when a weight's shape differs from the config's model (a class head for another number of classes:
    the message names the config's num_labels, its id2label's length and the weights' class count; allowed with
    ``ignore_mismatched_sizes=True``, which starts those tensors afresh) and when a weight is NaN or Inf
    (`check_finite_weights`).
    """
    source = str(source)
    allow_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
    try:
        # mismatched sizes are loaded as transformers' report of them and refused below, in one line
        model, info = model_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except SafetensorError as err:
        raise ValueError(f"{_weights_name(source)} is corrupt or truncated ({err}); "
                         "save or download it again") from None
    except OSError as err:  # transformers' word for a folder or repo without a loadable config or weights
        raise ValueError(f"cannot load a model from {source}: {' '.join(str(err).split())}") from None
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched and not allow_mismatched:
        raise ValueError(_size_mismatch_message(model.config, _weights_name(source), mismatched))
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        message = (f"{_weights_name(source)} is incomplete: {len(missing)} parameter(s) missing, e.g. {missing[:3]}; "
                   "they would be randomly initialised")
        if not allow_missing:
            raise ValueError(f"{message}. Save the complete model again (model.save_pretrained)")
        logger.warning("%s (new layers start from scratch)", message)
    check_finite_weights(model, _weights_name(source))
    return model


CLASS_HEAD_KEYS = ("class_labels_classifier.weight", "class_labels_classifier.bias")


def _size_mismatch_message(config: Any, weights: str, mismatched: list[tuple[str, Any, Any]]) -> str:
    """One line for ``load_checked``'s (key, shape in the weights, shape in the model) triples."""
    head = next(((key, saved) for key, saved, _ in mismatched if key in CLASS_HEAD_KEYS), None)
    if head is not None:
        classes = int(head[1][0]) - 1  # the last output is "no object"
        return (f"{weights} has a class head for {classes} classes (+ no object) but the config has "
                f"num_labels={config.num_labels} and {len(config.id2label)} names in id2label; load the weights with "
                "the config saved with them, or pass ignore_mismatched_sizes=True to start a new class head")
    key, saved, expected = mismatched[0]
    return (f"{weights} does not fit the config: {key} has shape {tuple(saved)} in the weights, {tuple(expected)} in "
            f"the model ({len(mismatched)} tensor(s) differ); load the weights with the config saved with them")


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """ValueError naming the first tensors of ``model`` (parameters and buffers) holding NaN or Inf."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what}: {len(bad)} weight tensor(s) hold NaN or Inf, e.g. {bad[:3]}; such a model gives "
                         "no meaningful detections (was it saved after the loss diverged?)")


def check_finite_outputs(logits: torch.Tensor, pred_boxes: torch.Tensor, what: str) -> None:
    """ValueError when ``logits`` (B, Q, C + 1) or ``pred_boxes`` (B, Q, 4) hold NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(logits).all() & torch.isfinite(pred_boxes).all()):
        raise ValueError(f"{what}: the model's outputs hold NaN or Inf; its weights or the input images are broken "
                         "(no detection or metric of these outputs would mean anything)")


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give each file of ``paths`` (a folder: every file under it) the mode a plain ``open(path, "w")`` gives,
    ``0o666 & ~umask`` (0644 under umask 022).

    For files written by a library through a private temporary file: safetensors' ``save_file`` (so
    ``save_pretrained`` and accelerate's ``save_state``) leaves 0600 whatever the umask, which other users of a
    shared run folder cannot read. Call it on what was just written.
    """
    mode = 0o666 & ~current_umask()
    for path in map(Path, paths):
        for file in (path.rglob("*") if path.is_dir() else [path]):
            if file.is_file() and not file.is_symlink():
                os.chmod(file, mode)


def debug_requested(argv: list[str] | None = None) -> bool:
    """True with ``--debug`` on the command line or ``DETR_CUSTOM_DEBUG=1`` in the environment."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in (sys.argv[1:] if argv is None else argv)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``: a ValueError (bad input or settings) is printed as one line ``error: ...``
    with exit status 1; its traceback only when `debug_requested`."""
    try:
        main()
    except ValueError as err:
        if debug_requested():
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["read_json", "make_output_folder", "check_not_model_file", "WriteError", "refused_write",
           "reporting_write_errors", "exception_chain", "free_bytes", "load_checked",
           "check_finite_weights", "check_finite_outputs", "current_umask", "follow_umask", "debug_requested",
           "run_cli"]
