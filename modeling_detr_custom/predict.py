"""Run a saved detr-custom detector on image files: detections as JSON, and each image with its boxes drawn
(`drawing.draw_detections`: a colour per label, a "label score" tag per box).

Not remote code: nothing in the model, config or processor files imports this module.

The path is the object-detection pipeline's (image processor -> model -> ``post_process_object_detection``),
batched, on a GPU when there is one; the forward in float32, or under bfloat16 autocast with ``dtype="bf16"``
(`precision.inference_autocast`; post-processing stays float32). Box format everywhere here: absolute
``(xmin, ymin, xmax, ymax)`` pixels of the image as displayed (after its EXIF orientation is applied), as the
pipeline returns them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps
import torch

from .checks import check_finite_outputs, load_checked, make_output_folder, read_json, reporting_write_errors
from .drawing import draw_detections
from .folder_lock import hold_folder
from .image_processing_detr_custom import pil_to_rgb8
from .precision import check_inference_dtype, inference_autocast

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
REPORT_FILE = "detections.json"
BOX_FORMAT = "xyxy: absolute (xmin, ymin, xmax, ymax) pixels of the image after its EXIF orientation"


class ModelLoadError(RuntimeError):
    """The model argument names no loadable model; the message names the path or repo id."""


class UnusableImageError(ValueError):
    """The image processor refused a batch of same-size images (e.g. a size whose resize reaches zero pixels)."""


# ----------------------------------------------------------------------------- inputs


def collect_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand the command-line inputs into image files, in order.

    A folder contributes its files with an image extension (sorted, not recursive). A path that does not
    exist is skipped with a reason; files are not opened here (a file that is not an image is found when it
    is decoded). Returns (files, skipped) with skipped = [{"path", "reason"}].
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                reason = f"folder holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
                skipped.append({"path": str(path), "reason": reason})
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            skipped.append({"path": str(path), "reason": "no such file or folder"})
    unique = list(dict.fromkeys(files))  # a file named twice is processed once
    return unique, skipped


# What PIL raises for a file it cannot decode; DecompressionBombError (an Exception only) is the image over
# PIL's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS pixels, which predict keeps as PIL sets it.
UNREADABLE = (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def _unreadable(path: Path, err: Exception) -> ValueError:
    """The one-line reason ``path`` cannot be used, from PIL's error."""
    if isinstance(err, PIL.Image.DecompressionBombError):
        return ValueError(f"{path} is over PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS): {err}")
    return ValueError(f"{path} is not a readable image: {err}")


def open_image(path: Path) -> PIL.Image.Image:
    """The image as displayed: EXIF orientation applied, 8-bit RGB (16-bit images scaled, `pil_to_rgb8`).
    Raises ValueError naming the file if it is not an image PIL can decode, is over PIL's decompression-bomb
    limit, or has values its mode cannot hold."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            upright = PIL.ImageOps.exif_transpose(image)
    except UNREADABLE as err:
        raise _unreadable(path, err) from None
    return pil_to_rgb8(upright, str(path))


# ----------------------------------------------------------------------------- the model


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. Raises ValueError for an unknown or unavailable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
    return torch.device(device)


def _looks_like_local_path(ref: str) -> bool:
    """True for what can only be a local path (a Hub repo id is 'name' or 'namespace/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.startswith((".", "/", "~")) or "\\" in ref or ref.count("/") > 1:
        return True
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return True
    return False


def load_detector(model_ref: str | os.PathLike, device: torch.device) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, image processor) from a saved folder or a Hub repo id.

    Loads through AutoModelForObjectDetection / AutoImageProcessor with trust_remote_code=True, as a user of
    the uploaded folder would. Raises ModelLoadError naming the path or repo id.
    """
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    ref = str(model_ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a saved model folder (no config.json in it)")
        source, what = str(path), f"the folder {path}"
    elif _looks_like_local_path(ref):
        raise ModelLoadError(f"model folder not found: {ref} ({path.resolve()})")
    else:
        source, what = ref, f"{ref!r} (no local folder of that name; tried it as a Hub repo id)"
    try:  # corrupt, incomplete or non-finite weights are refused: they would give wrong detections, silently
        model = load_checked(AutoModelForObjectDetection, source, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"cannot load a detector from {what}: {err}") from None
    return model.to(device).eval(), processor


@torch.no_grad()
def detect(model: Any, processor: Any, images: Sequence[PIL.Image.Image], threshold: float,
           device: torch.device, dtype: str = "fp32") -> list[list[dict[str, Any]]]:
    """Detections of one batch, as the object-detection pipeline computes them. Raises UnusableImageError when
    the processor refuses the images (same-size batches: the reason holds for each of them).

    ``dtype``: "fp32" or "bf16", the forward's precision (`precision.inference_autocast`; ValueError if
    ``device`` cannot run it). Post-processing computes scores and boxes in float32 either way.

    Returns per image a list of {"label": name, "label_id": int, "score": float, "box": {"xmin", "ymin",
    "xmax", "ymax"}} with float pixel coordinates of that image (each image's own size, padding removed).
    """
    try:
        inputs = processor(images=list(images), return_tensors="pt", device=device)
    except ValueError as err:  # the images' own fault (their size): the caller skips them, not the run
        raise UnusableImageError(str(err)) from None
    with inference_autocast(dtype, device):  # the forward only: post-processing casts to float32 itself
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    check_finite_outputs(outputs.logits, outputs.pred_boxes, f"detections of a batch of {len(images)} image(s)")
    sizes = torch.tensor([[im.height, im.width] for im in images], device=device)
    results = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
    id2label = model.config.id2label
    return [[{"label": id2label.get(int(label), str(int(label))), "label_id": int(label),
              "score": round(float(score), 5),
              "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(float(v), 2) for v in box)))}
             for score, label, box in zip(r["scores"].cpu(), r["labels"].cpu(), r["boxes"].cpu())]
            for r in results]


# ----------------------------------------------------------------------------- drawing


def draw_report_detections(image: PIL.Image.Image, detections: Sequence[dict[str, Any]],
                           id2label: Mapping[int, str]) -> PIL.Image.Image:
    """`drawing.draw_detections` of one image's entries of the report (`detect`'s format), as the report
    has them: the rounded scores and boxes the JSON holds are the ones drawn."""
    columns = {"boxes": [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in detections],
               "scores": [d["score"] for d in detections], "labels": [d["label_id"] for d in detections]}
    return draw_detections(image, columns, id2label)


# ----------------------------------------------------------------------------- the whole run


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as displayed (EXIF orientation applied), read from the header only.
    Raises ValueError naming the file if PIL does not recognise it as an image."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except UNREADABLE as err:
        raise _unreadable(path, err) from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 90-degree rotations swap


def same_size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by image size, in first-seen order, then cut into batches of at most ``batch_size``.

    Only equal sizes share a batch, so no image is padded: DETR's backbone sees the zero padding beyond an
    image's border, which moves its scores (by 0.05 for 64 px images), and a result should not depend on
    which other images were in the run. Same-size images (the usual case) still batch fully.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return [group[start:start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)]


def _run_batch(model: Any, processor: Any, paths: Sequence[Path], indices: Sequence[int], threshold: float,
               device: torch.device, skipped: list[dict[str, str]], log: Any, dtype: str = "fp32") -> dict[int, tuple]:
    """Decode and detect one batch; {input index: (entry, image, detections)}. Files that fail to decode
    (a truncated image passes the header check) are added to ``skipped``."""
    opened = []
    for path, index in zip(paths, indices):
        try:
            opened.append((index, path, open_image(path)))
        except ValueError as err:
            skipped.append({"path": str(path), "reason": str(err)})
            log(f"skipped {path}: {err}")
    if not opened:
        return {}
    try:
        found = detect(model, processor, [image for _, _, image in opened], threshold, device, dtype)
    except UnusableImageError as err:
        for _, path, _ in opened:
            skipped.append({"path": str(path), "reason": f"{path} cannot be processed: {err}"})
            log(f"skipped {path}: {path} cannot be processed: {err}")
        return {}
    return {index: ({"path": str(path), "width": image.width, "height": image.height}, image, detections)
            for (index, path, image), detections in zip(opened, found)}


def _read_report(folder: Path) -> dict[str, Any] | None:
    """The report an earlier run wrote into ``folder``; None when it holds no detections.json. Raises
    ValueError when its detections.json is not such a report."""
    report_path = folder / REPORT_FILE
    if not report_path.is_file():
        return None
    report = read_json(report_path)
    if not (isinstance(report, dict) and "box_format" in report and isinstance(report.get("images"), list)):
        raise ValueError(f"{report_path} exists and is not a report of predict.py; choose another output_dir "
                         "(it is never overwritten)")
    return report


def _drawn_names(report: dict[str, Any]) -> set[str]:
    """The images a report says its run drew: plain ``.png`` names (a hand-edited report names nothing else)."""
    names = {i.get("output_image") for i in report["images"] if isinstance(i, dict)}
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith(".png")}


def own_drawings(folder: Path) -> set[str]:
    """Names of the images predict.py drew into ``folder``, as the detections.json there lists them."""
    try:
        report = _read_report(folder)
    except (ValueError, OSError):  # someone else's (or an unreadable) detections.json: nothing here is predict's
        return set()
    return _drawn_names(report) if report is not None else set()


def without_own_drawings(files: Sequence[Path]) -> tuple[list[Path], int]:
    """``files`` less the images predict.py drew (listed in the detections.json beside them): a run into its
    input folder, repeated, must not detect objects in its own drawings. Returns (kept, how many left out)."""
    drawn = {folder: own_drawings(folder) for folder in {path.parent for path in files}}
    kept = [path for path in files if path.name not in drawn[path.parent]]
    return kept, len(files) - len(kept)


def _replaceable(out: Path, overwrite: bool) -> set[str]:
    """Names in ``out`` this run may replace: with ``overwrite``, the report and drawings of an earlier run.
    Without it an earlier run's folder is refused (its detections would be lost); so is a foreign report."""
    report = _read_report(out)
    if report is None:
        return set()
    if not overwrite:
        raise ValueError(f"{out} holds the detections of an earlier predict.py run ({REPORT_FILE}); pass "
                         "--overwrite (overwrite=True) to replace that run's files, or choose another output_dir")
    return {REPORT_FILE} | _drawn_names(report)


def _taken_names(out: Path, files: Sequence[Path], overwrite: bool) -> set[str]:
    """Names in ``out`` no output may take: the inputs in it and every existing file but `_replaceable`."""
    existing = {p.name for p in out.iterdir()} - _replaceable(out, overwrite)
    return existing | {p.name for p in files if p.resolve().parent == out.resolve()}


def _output_name(path: Path, used: set[str]) -> str:
    """``<stem>.png``, with a counter when two inputs share a stem or the name is taken (``used``)."""
    name, k = f"{path.stem}.png", 1
    while name in used or name == REPORT_FILE:
        name, k = f"{path.stem}_{k}.png", k + 1
    used.add(name)
    return name


def _readable_sizes(files: Sequence[Path], skipped: list[dict[str, str]],
                    log: Any) -> tuple[list[Path], list[tuple[int, int]]]:
    """(the files PIL recognises as images, their displayed sizes); the others are added to ``skipped``."""
    readable, sizes = [], []
    for path in files:
        try:
            sizes.append(displayed_size(path))
            readable.append(path)
        except ValueError as err:
            skipped.append({"path": str(path), "reason": str(err)})
            log(f"skipped {path}: {err}")
    return readable, sizes


def predict_images(model_ref: str | os.PathLike, inputs: Sequence[str | os.PathLike], threshold: float = 0.5,
                   output_dir: str | os.PathLike = "predictions", batch_size: int = 4, device: str = "auto",
                   log: Any = print, overwrite: bool = False, dtype: str = "fp32") -> dict[str, Any]:
    """Detect objects in every image of ``inputs`` (files or folders); write ``<output_dir>/detections.json``
    and one ``<stem>.png`` per image with the detections drawn (``<stem>_1.png`` when the name is taken: an
    input or a file an earlier run did not write is never replaced). Inputs that are not images, or that PIL
    or the processor cannot use (over PIL's decompression-bomb limit, a size whose resize reaches zero), are
    reported through ``log`` and listed under "skipped"; the rest are still processed. Images an earlier run
    drew (listed in the detections.json beside them) are never inputs: their count is logged.

    ``output_dir`` is held for the run (`folder_lock.hold_folder`: a second run into it is refused, naming the
    first one's pid). A folder holding an earlier run's detections.json is refused unless ``overwrite``, which
    lets this run replace that run's report and drawings (and nothing else).

    ``dtype``: "fp32" (the default) or "bf16", the precision of the model's forward (`precision.inference_autocast`:
    bfloat16 autocast, which needs a CPU with native bfloat16 or a GPU with bf16); checked before anything is loaded.

    Returns the JSON report: {"model", "threshold", "device", "dtype", "box_format", "images": [{"path", "width",
    "height", "output_image", "detections": [...]}], "skipped": [{"path", "reason"}]}.
    Raises ValueError for bad settings, a refused output folder or a failed write (naming the path and the OS
    reason), and ModelLoadError when the model cannot be loaded.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold {threshold!r} must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be >= 1")
    torch_device = resolve_device(device)
    check_inference_dtype(dtype, torch_device)  # before the model and any image are loaded
    model, processor = load_detector(model_ref, torch_device)  # before any output: a bad model writes nothing
    files, skipped = collect_images(inputs)
    files, drawn = without_own_drawings(files)
    if drawn:
        log(f"left out {drawn} image(s) drawn by an earlier predict.py run (listed in the {REPORT_FILE} beside them)")
    out = make_output_folder(output_dir, "output_dir")
    with hold_folder(out, "predict.py"):
        used = _taken_names(out, files, overwrite)  # outputs never replace an input or a file of someone else
        report: dict[str, Any] = {"model": str(model_ref), "threshold": threshold, "device": str(torch_device),
                                  "dtype": dtype, "box_format": BOX_FORMAT, "images": [], "skipped": skipped}
        for item in skipped:
            log(f"skipped {item['path']}: {item['reason']}")
        report["images"] = _detect_and_draw(out, used, model, processor, files, skipped, threshold, batch_size,
                                            torch_device, log, dtype)
        with reporting_write_errors(out / REPORT_FILE):  # a read-only folder or a full disk: one line
            (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _detect_and_draw(out: Path, used: set[str], model: Any, processor: Any, files: Sequence[Path],
                     skipped: list[dict[str, str]], threshold: float, batch_size: int, device: torch.device,
                     log: Any, dtype: str = "fp32") -> list[dict[str, Any]]:
    """The report's "images": each readable file's detections, drawn into ``out`` under a name not in ``used``.
    Files that cannot be used are added to ``skipped``."""
    readable, sizes = _readable_sizes(files, skipped, log)
    names = [_output_name(path, used) for path in readable]  # from the inputs' order, whatever the batching
    entries: dict[int, dict[str, Any]] = {}
    for batch in same_size_batches(sizes, batch_size):
        done = _run_batch(model, processor, [readable[i] for i in batch], batch, threshold, device, skipped, log,
                          dtype)
        for index, (entry, image, detections) in done.items():  # drawn now: decoded images are not kept
            with reporting_write_errors(out / names[index]):
                draw_report_detections(image, detections, model.config.id2label).save(out / names[index])
            entries[index] = {**entry, "output_image": names[index], "detections": detections}
            log(f"{entry['path']}: {len(detections)} detection(s) -> {out / names[index]}")
    return [entries[i] for i in sorted(entries)]


__all__ = ["ModelLoadError", "UnusableImageError", "collect_images", "without_own_drawings", "open_image",
           "resolve_device", "load_detector", "detect", "draw_report_detections", "predict_images"]
