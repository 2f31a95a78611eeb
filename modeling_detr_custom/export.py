"""Export a detr-custom detector to ONNX, verified with onnxruntime before anything is written.

Not remote code: nothing in the model, config or processor files imports this module.

The graph is the model's inference path in eval mode:

    pixel_values (B, 3, H, W) float32: normalised RGB, zero-padded bottom/right
    pixel_mask   (B, H, W) int64: 1 on real pixels, 0 on padding
        -> logits     (B, Q, C + 1) float32: class logits, the last class is "no object"
           pred_boxes (B, Q, 4) float32: normalised (cx, cy, w, h) relative to each image's UNPADDED size

B is 1 unless ``dynamic_batch``, H x W is the export canvas unless ``dynamic_size``; Q is ``config.num_queries``
(eval mode uses the first query group only) and C ``config.num_labels``. The graph is exported to a temporary file
beside the output and run in onnxruntime (CPUExecutionProvider) against PyTorch on two random images of different
sizes, the smaller zero-padded bottom/right (mask 0 there): at batch 1 (each image alone) and, with
``dynamic_batch``, at batch 2 (one padded batch); with ``dynamic_size`` on a second canvas too. Only when every
check agrees within ``ATOL`` and all outputs are finite are ``FILE.onnx`` and ``FILE.json`` (input/output names
and shapes, opset, id2label, the processor settings a runtime needs, the checks) renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_not_model_file, follow_umask, reporting_write_errors
from .predict import load_detector

ATOL = 1e-4  # largest |onnxruntime - PyTorch| accepted on logits and on pred_boxes
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20  # scaled_dot_product_attention needs 14; the TorchScript exporter stops at 20
MIN_SIDE = 32  # below the backbone's stride the feature map is a single cell
INPUT_NAMES = ("pixel_values", "pixel_mask")
OUTPUT_NAMES = ("logits", "pred_boxes")
SMALL_IMAGE_FRACTION = (0.75, 0.6)  # (height, width) of the padded verification image, of the canvas
SECOND_CANVAS_FRACTION = (0.8, 0.7)  # the other canvas a dynamic-size export is checked on
PROCESSOR_KEYS = ("do_resize", "size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                  "do_pad", "pad_size")
EXPORTER = "torch.onnx.export(dynamo=False), the TorchScript tracer"


class OnnxExportError(RuntimeError):
    """The export failed or its graph disagrees with PyTorch; the message says where and by how much."""


class DetectionGraph(nn.Module):
    """The inference outputs of a detector as a plain tuple, the form ``torch.onnx.export`` traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values: (B, 3, H, W) float32; pixel_mask: (B, H, W) int64, 1 on real pixels.

        Returns logits (B, Q, C + 1) and pred_boxes (B, Q, 4) normalised (cx, cy, w, h).
        """
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes


# ----------------------------------------------------------------------------- options


def default_canvas(processor: Any) -> tuple[int, int]:
    """(height, width) the processor's batches have: its ``pad_size`` if set, a fixed ``size`` {height, width},
    else (shortest_edge, longest_edge), landscape; without a longest_edge the width of a 4:3 image."""
    if processor.pad_size:
        return processor.pad_size["height"], processor.pad_size["width"]
    size = processor.size
    if "height" in size:
        return size["height"], size["width"]
    shortest = size["shortest_edge"]
    return shortest, size.get("longest_edge") or shortest * 4 // 3


def sidecar_path(output: str | os.PathLike) -> Path:
    """The JSON written beside ``FILE.onnx``: ``FILE.json``."""
    return Path(output).with_suffix(".json")


def check_output_path(output: str | os.PathLike, overwrite: bool) -> Path:
    """``output`` as a Path after checking it can be written: an ``.onnx`` name in an existing folder, neither it
    nor its JSON already there unless ``overwrite``, and neither a file of a model folder (`check_not_model_file`:
    MODEL/config.onnx would put its JSON over MODEL/config.json), even with ``overwrite``. Raises ValueError
    naming the path."""
    path = Path(output).expanduser()
    if path.suffix != ".onnx":
        raise ValueError(f"output {str(path)!r} must end with .onnx (its settings go to {sidecar_path(path).name})")
    if not path.parent.is_dir():
        raise ValueError(f"output {str(path)!r}: its folder {str(path.parent)!r} is not an existing directory")
    for existing in (path, sidecar_path(path)):
        check_not_model_file(existing)
        if existing.exists() and not overwrite:
            raise ValueError(f"{str(existing)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    return path


def check_export_options(opset: int, canvas: tuple[int, int]) -> None:
    """Raise ValueError for an opset the exporter cannot write or a canvas the backbone cannot see."""
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset!r} is not supported: expected an int from {MIN_OPSET} to {MAX_OPSET}")
    if not all(isinstance(side, int) and side >= MIN_SIDE for side in canvas):
        raise ValueError(f"export size {canvas} (height, width): expected two ints >= {MIN_SIDE}")


# ----------------------------------------------------------------------------- export


def dynamic_axes(dynamic_batch: bool, dynamic_size: bool) -> dict[str, dict[int, str]]:
    """Symbolic axis names per input/output, as ``torch.onnx.export(dynamic_axes=...)`` takes them."""
    batch = {0: "batch"} if dynamic_batch else {}
    image = {2: "height", 3: "width"} if dynamic_size else {}
    mask = {1: "height", 2: "width"} if dynamic_size else {}
    return {"pixel_values": {**batch, **image}, "pixel_mask": {**batch, **mask},
            "logits": dict(batch), "pred_boxes": dict(batch)}


def export_graph(graph: nn.Module, example: tuple[Tensor, Tensor], path: Path, opset: int,
                 axes: dict[str, dict[int, str]]) -> list[str]:
    """Write ``graph`` traced on ``example`` (pixel_values, pixel_mask) to ``path``.

    Returns the distinct places (file:line) where the tracer warned that it recorded a Python value as a
    constant: where to look when the graph then disagrees with PyTorch.
    """
    # The TorchScript exporter, not torch.export (dynamo=True): on torch 2.14 both export this model, fixed and
    # dynamic, and agree with PyTorch to float32 rounding (2e-6 for R50 at 320x480), but the tracer took 1 s for
    # the tiny model and 7 s for R50 against 15 s and 36 s (2 busy cores), keeps the axis names given (dynamo
    # renames axes that share constraints) and needs no onnxscript. It is deprecated since torch 2.9; its known
    # weakness (Python control flow on tensor values becomes a constant) is what the onnxruntime checks catch.
    with warnings.catch_warnings(record=True) as caught:  # also silences the deprecation notice, chosen knowingly
        try:
            torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                              input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                              dynamic_axes={name: axis for name, axis in axes.items() if axis})
        except RuntimeError as err:
            raise OnnxExportError(f"torch.onnx.export failed at opset {opset}: {err}") from err
    return list(dict.fromkeys(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                              if issubclass(w.category, torch.jit.TracerWarning)))


# ----------------------------------------------------------------------------- verification


def _scaled(canvas: tuple[int, int], fraction: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of ``canvas`` times ``fraction``, rounded, at least 1."""
    return max(1, round(canvas[0] * fraction[0])), max(1, round(canvas[1] * fraction[1]))


def padded_images(canvas: tuple[int, int], image_sizes: Sequence[tuple[int, int]],
                  seed: int) -> tuple[Tensor, Tensor]:
    """Random normalised images of (height, width) ``image_sizes`` on one canvas, zero-padded bottom/right.

    Returns pixel_values (B, 3, H, W) float32 and pixel_mask (B, H, W) int64 (1 on real pixels).
    """
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(len(image_sizes), 3, *canvas)
    pixel_mask = torch.zeros(len(image_sizes), *canvas, dtype=torch.int64)
    for i, (h, w) in enumerate(image_sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def verification_runs(canvas: tuple[int, int], dynamic_batch: bool,
                      dynamic_size: bool) -> list[tuple[str, Tensor, Tensor]]:
    """(name, pixel_values, pixel_mask) of every check: on each canvas a full-size image and a smaller padded
    one, each alone (batch 1) and, with ``dynamic_batch``, together (batch 2)."""
    canvases = [canvas] + ([_scaled(canvas, SECOND_CANVAS_FRACTION)] if dynamic_size else [])
    runs = []
    for k, (height, width) in enumerate(canvases):
        images = [(height, width), _scaled((height, width), SMALL_IMAGE_FRACTION)]
        batches = [[image] for image in images] + ([images] if dynamic_batch else [])
        for j, sizes in enumerate(batches):
            pixel_values, pixel_mask = padded_images((height, width), sizes, seed=10 * k + j)
            described = " + ".join(f"{h}x{w}" for h, w in sizes)
            runs.append((f"batch {len(sizes)} on a {height}x{width} canvas (images {described})",
                         pixel_values, pixel_mask))
    return runs


def _onnx_session(path: Path) -> Any:
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's pybind errors share no base class more specific than Exception
        raise OnnxExportError(f"onnxruntime cannot load the exported graph: {err}") from err


def _check_outputs(name: str, runtime: str, outputs: Sequence[np.ndarray],
                   expected_shapes: Sequence[tuple[int, ...]]) -> None:
    """Raise OnnxExportError unless each output has its expected shape and only finite values."""
    for output_name, array, shape in zip(OUTPUT_NAMES, outputs, expected_shapes):
        if tuple(array.shape) != shape:
            raise OnnxExportError(f"check '{name}': {runtime} {output_name} has shape {tuple(array.shape)}, "
                                  f"expected {shape} (batch, num_queries, ...)")
        if not np.isfinite(array).all():
            raise OnnxExportError(f"check '{name}': {runtime} {output_name} has non-finite values "
                                  f"({int((~np.isfinite(array)).sum())} of {array.size})")


@torch.no_grad()
def verify_graph(path: Path, graph: nn.Module, runs: Sequence[tuple[str, Tensor, Tensor]], num_queries: int,
                 num_classes: int, tracer_warnings: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run the ONNX file in onnxruntime and ``graph`` in PyTorch on every run; returns per check its name and
    the max |diff| per output. Raises OnnxExportError listing every check over ``ATOL`` (and where the tracer
    warned), or on the first non-finite output or wrong shape (logits (b, num_queries, num_classes + 1),
    pred_boxes (b, num_queries, 4))."""
    session = _onnx_session(path)
    checks, failed = [], []
    for name, pixel_values, pixel_mask in runs:
        shapes = [(len(pixel_values), num_queries, num_classes + 1), (len(pixel_values), num_queries, 4)]
        reference = [t.numpy() for t in graph(pixel_values, pixel_mask)]
        _check_outputs(name, "PyTorch", reference, shapes)
        try:
            found = session.run(list(OUTPUT_NAMES), {"pixel_values": pixel_values.numpy(),
                                                     "pixel_mask": pixel_mask.numpy()})
        except Exception as err:  # see _onnx_session
            raise OnnxExportError(f"check '{name}': onnxruntime cannot run the exported graph: {err}") from err
        _check_outputs(name, "onnxruntime", found, shapes)
        diff = {n: float(np.abs(f - r).max()) for n, f, r in zip(OUTPUT_NAMES, found, reference)}
        checks.append({"check": name, "max_abs_diff": diff})
        if max(diff.values()) > ATOL:
            failed.append(f"'{name}': max |diff| " + ", ".join(f"{n} {d:.3g}" for n, d in diff.items()))
    if failed:
        where = f"; the tracer recorded Python values as constants at {', '.join(tracer_warnings)}" \
            if tracer_warnings else ""
        raise OnnxExportError(f"the exported graph disagrees with PyTorch (tolerance {ATOL:g}) on "
                              f"{len(failed)} of {len(runs)} checks: {'; '.join(failed)}{where}")
    return checks


# ----------------------------------------------------------------------------- the JSON beside the graph


def _shape(axes: dict[int, str], sizes: Sequence[int]) -> list[int | str]:
    return [axes.get(i, size) for i, size in enumerate(sizes)]


def export_spec(model: nn.Module, processor: Any, onnx_name: str, opset: int, canvas: tuple[int, int],
                axes: dict[str, dict[int, str]], checks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a runtime needs besides the graph: names, shapes (symbolic names on dynamic axes), dtypes and
    formats of inputs and outputs, the opset, the labels and the processor's settings. A fixed-size graph
    needs every batch padded to exactly its canvas, so its ``processor.pad_size`` is that canvas."""
    config = model.config
    height, width = canvas
    queries, classes = config.num_queries, config.num_labels + 1
    processor_settings = {key: getattr(processor, key) for key in PROCESSOR_KEYS}
    if 2 not in axes["pixel_values"]:
        processor_settings["pad_size"] = {"height": height, "width": width}
    return {
        "onnx_file": onnx_name,
        "model": str(model.name_or_path),
        "opset": opset,
        "exporter": f"{EXPORTER}, torch {torch.__version__}",
        "inputs": [
            {"name": "pixel_values", "shape": _shape(axes["pixel_values"], (1, 3, height, width)),
             "dtype": "float32", "format": "normalised RGB, each image at the top left, zero padding"},
            {"name": "pixel_mask", "shape": _shape(axes["pixel_mask"], (1, height, width)), "dtype": "int64",
             "format": "1 on real pixels, 0 on padding"},
        ],
        "outputs": [
            {"name": "logits", "shape": _shape(axes["logits"], (1, queries, classes)), "dtype": "float32",
             "format": "class logits; the last class is 'no object'"},
            {"name": "pred_boxes", "shape": _shape(axes["pred_boxes"], (1, queries, 4)), "dtype": "float32",
             "format": "normalised (cx, cy, w, h) relative to each image's unpadded size"},
        ],
        "num_queries": queries,
        "num_labels": config.num_labels,
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "processor": {"image_processor_type": type(processor).__name__, **processor_settings},
        "verification": {"runtime": "onnxruntime CPUExecutionProvider", "tolerance": ATOL, "checks": checks},
    }


# ----------------------------------------------------------------------------- the whole export


def _remove(*paths: Path | None) -> None:
    for path in filter(None, paths):
        path.unlink(missing_ok=True)


def _temporary_file(beside: Path, suffix: str) -> Path:
    """An empty file in ``beside``'s folder (same file system, so the final rename is atomic). mkstemp makes it
    0600; `_put_in_place` gives it the user's umask mode."""
    handle, name = tempfile.mkstemp(prefix=f".{beside.stem}.", suffix=suffix, dir=beside.parent)
    os.close(handle)
    return Path(name)


def _put_in_place(tmp_onnx: Path, tmp_json: Path, path: Path) -> None:
    """Rename the verified graph and its JSON to ``path`` and its sidecar, with the mode any new file gets."""
    follow_umask(tmp_onnx, tmp_json)
    os.replace(tmp_onnx, path)
    os.replace(tmp_json, sidecar_path(path))


def export_detector(model: nn.Module, processor: Any, output: str | os.PathLike, opset: int = DEFAULT_OPSET,
                    dynamic_batch: bool = False, dynamic_size: bool = False,
                    canvas: tuple[int, int] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export ``model`` (a DetrCustomForObjectDetection) to ``output`` (FILE.onnx) and FILE.json, verified.

    Args:
        model, processor: the detector (moved to the CPU and put in eval mode, in place) and its image
            processor (for the default canvas and the JSON).
        output: the .onnx path; its folder must exist. Refused if it or its JSON exists, unless ``overwrite``.
        opset: ONNX opset, MIN_OPSET to MAX_OPSET.
        dynamic_batch, dynamic_size: make the batch axis / the height and width axes symbolic.
        canvas: (height, width) of the export; default `default_canvas(processor)`.

    Returns the JSON written beside the graph (see `export_spec`). Raises ValueError for bad arguments and
    OnnxExportError when the export fails or disagrees with PyTorch; then nothing is written.
    """
    path = check_output_path(output, overwrite)
    canvas = tuple(canvas) if canvas is not None else default_canvas(processor)
    check_export_options(opset, canvas)
    graph = DetectionGraph(model.cpu()).eval()  # eval mode reaches the model too
    axes = dynamic_axes(dynamic_batch, dynamic_size)
    # a dynamic batch is traced at 2: at 1 the tracer may treat the batch axis as a constant 1
    example = padded_images(canvas, [canvas] * (2 if dynamic_batch else 1), seed=1234)
    tmp_onnx = tmp_json = None
    try:
        with reporting_write_errors(path):  # a read-only folder or a full disk: one line naming the path
            tmp_onnx = _temporary_file(path, ".onnx.tmp")
            tmp_json = _temporary_file(path, ".json.tmp")
        with torch.no_grad(), reporting_write_errors(path):
            tracer_warnings = export_graph(graph, example, tmp_onnx, opset, axes)
        checks = verify_graph(tmp_onnx, graph, verification_runs(canvas, dynamic_batch, dynamic_size),
                              model.config.num_queries, model.config.num_labels, tracer_warnings)
        spec = export_spec(model, processor, path.name, opset, canvas, axes, checks)
        with reporting_write_errors(path):
            tmp_json.write_text(json.dumps(spec, indent=2) + "\n")
            check_output_path(path, overwrite)  # again: another export may have written it meanwhile
            _put_in_place(tmp_onnx, tmp_json, path)
    finally:
        _remove(tmp_onnx, tmp_json)
    return spec


def export_onnx(model_ref: str | os.PathLike, output: str | os.PathLike, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, dynamic_size: bool = False, height: int | None = None,
                width: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Load a saved detector (folder or Hub repo id, ``trust_remote_code=True``) and `export_detector` it.

    ``height`` and ``width`` (both or neither) set the export canvas; default: from the processor's size.
    Raises ModelLoadError when the model cannot be loaded, else as `export_detector`.
    """
    if (height is None) != (width is None):
        raise ValueError(f"height={height!r}, width={width!r}: give both or neither")
    check_output_path(output, overwrite)  # before loading a model: a bad path fails at once
    model, processor = load_detector(model_ref, torch.device("cpu"))
    canvas = (height, width) if height is not None else None
    return export_detector(model, processor, output, opset, dynamic_batch, dynamic_size, canvas, overwrite)


__all__ = ["ATOL", "DEFAULT_OPSET", "DetectionGraph", "OnnxExportError", "default_canvas", "export_detector",
           "export_onnx", "sidecar_path", "verify_graph"]
