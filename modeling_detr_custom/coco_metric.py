"""COCO box AP with pycocotools or faster-coco-eval, as a self-contained ``evaluate`` metric module.

Not remote code, and deliberately free of imports from this package so that
``evaluate.load("path/to/coco_metric.py")`` (which copies this ONE file into its modules cache)
works offline. The class can also be built directly: ``CocoDetectionMetric()``; and
:func:`coco_box_ap` does the same computation without evaluate's Arrow round trip.

Inputs, one entry per image:

* prediction: ``{"image_id": int, "boxes": [[x0, y0, x1, y1], ...] (n, 4) ABSOLUTE xyxy pixels of
  the ORIGINAL image, "scores": [...] (n,), "labels": [...] (n,) MODEL label ids}``; DETR keeps
  all queries (no threshold), as the original's evaluation does.
* reference, either the ground truth of that image ``{"image_id": int, "boxes": [[x, y, w, h], ...]
  (m, 4) ABSOLUTE COCO xywh pixels, "category_ids": [...] (m,) COCO category ids, "area": [...] (m,),
  "iscrowd": [...] (m,)}``, or just the ``image_id`` (int) when ``coco_gt`` (a pycocotools
  ``COCO`` object, an annotation json path or its dict) gives the ground truth.

Compute kwargs: ``coco_gt`` (see above) and ``label_to_category_id`` (model label -> COCO
category id; None = identity, right for raw COCO ids; labels missing from the mapping, e.g. "N/A"
gaps, are dropped, as pycocotools would ignore them anyway).

Evaluated images: the union of prediction and reference image ids. Duplicates (the padding
that distributed gathering adds) are removed first: the first entry per image id is kept.

Engine (``backend``): ``"faster"`` is faster-coco-eval's ``COCOeval_faster`` (a maintained C++ drop-in for
pycocotools' COCOeval: the same AP, several times faster on large sets), ``"pycocotools"`` the reference
``COCOeval``, ``"auto"`` (default) the first if it is installed, else the second.

Output: ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` as fractions in [0, 1]
exactly as pycocotools' ``COCOeval.stats`` (``-1.0`` where no ground truth of that area range
exists), plus ``num_images``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

BACKENDS: tuple[str, ...] = ("auto", "faster", "pycocotools")
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_DESCRIPTION = "COCO bounding-box AP/AR (pycocotools COCOeval, iouType='bbox', maxDets 1/10/100)."
_CITATION = """@inproceedings{lin2014microsoft, title={Microsoft COCO: Common Objects in Context},
author={Lin, Tsung-Yi and others}, booktitle={ECCV}, year={2014}}"""
_KWARGS_DESCRIPTION = __doc__

# float64 so boxes and scores reach pycocotools exactly as given
_PREDICTION = {
    "image_id": datasets.Value("int64"),
    "boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
    "scores": datasets.List(datasets.Value("float64")),
    "labels": datasets.List(datasets.Value("int64")),
}
_REFERENCE = {
    "image_id": datasets.Value("int64"),
    "boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
    "category_ids": datasets.List(datasets.Value("int64")),
    "area": datasets.List(datasets.Value("float64")),
    "iscrowd": datasets.List(datasets.Value("int64")),
}


def _as_int(value: Any) -> int:
    """An image id given as int, numpy scalar, 0-d/1-element tensor or 1-element list."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"image_id {value!r} must be a single number")
        value = value[0]
    return int(value)


def image_id_of(item: Any) -> int:
    """The image id of a prediction/reference dict, or of a bare id."""
    return _as_int(item["image_id"] if isinstance(item, Mapping) else item)


def deduplicate_by_image_id(items: Iterable[Any]) -> list[Any]:
    """Keep the first entry per image id, in order (removes distributed-gather padding)."""
    seen: set[int] = set()
    out = []
    for item in items:
        image_id = image_id_of(item)
        if image_id not in seen:
            seen.add(image_id)
            out.append(item)
    return out


def _tolist(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def predictions_from_post_processed(results: Sequence[Mapping[str, Any]], image_ids: Sequence[Any]) -> list[dict]:
    """``post_process_object_detection`` output (tensors; boxes absolute xyxy of the ORIGINAL
    image, i.e. called with ``target_sizes`` = original sizes) -> metric predictions (lists)."""
    return [
        {"image_id": _as_int(i), "boxes": _tolist(r["boxes"]), "scores": _tolist(r["scores"]),
         "labels": _tolist(r["labels"])}
        for r, i in zip(results, image_ids, strict=True)
    ]


def _quiet(fn, *args):
    """pycocotools prints progress; keep training logs clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco


def load_coco_gt(coco_gt: COCO | str | Path | Mapping) -> COCO:
    """A pycocotools COCO object from itself, an annotation json path, or the json's dict."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, Path)):
        return _coco_from_dict(json.loads(Path(coco_gt).read_text()))
    if isinstance(coco_gt, Mapping):
        return _coco_from_dict(copy.deepcopy(dict(coco_gt)))
    raise TypeError(f"coco_gt must be a pycocotools COCO, a json path or a dict, got {type(coco_gt)}")


def coco_gt_from_references(references: Sequence[Mapping[str, Any]]) -> COCO:
    """Per-image GT dicts (boxes absolute COCO xywh, COCO category ids) -> a COCO object."""
    images, annotations, cat_ids = [], [], set()
    for ref in references:
        image_id = image_id_of(ref)
        images.append({"id": image_id})
        n = len(ref["boxes"])
        area, crowd = ref.get("area") or [None] * n, ref.get("iscrowd") or [0] * n
        for box, cat, a, c in zip(ref["boxes"], ref["category_ids"], area, crowd, strict=True):
            box = [float(v) for v in box]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cat), "bbox": box,
                                "area": float(a) if a is not None else box[2] * box[3], "iscrowd": int(c)})
            cat_ids.add(int(cat))
    categories = [{"id": c, "name": str(c)} for c in sorted(cat_ids)]
    return _coco_from_dict({"images": images, "annotations": annotations, "categories": categories})


def detections_from_predictions(predictions: Sequence[Mapping[str, Any]],
                                label_to_category_id: Mapping[int, int] | None) -> list[dict]:
    """Predictions (boxes absolute xyxy, model labels) -> pycocotools results (bbox xywh, category_id)."""
    dets = []
    for pred in predictions:
        image_id = image_id_of(pred)
        for (x0, y0, x1, y1), score, label in zip(pred["boxes"], pred["scores"], pred["labels"], strict=True):
            label = int(label)
            if label_to_category_id is not None and label not in label_to_category_id:
                continue
            cat = int(label_to_category_id[label]) if label_to_category_id is not None else label
            dets.append({"image_id": image_id, "category_id": cat,
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)})
    return dets


def _load_detections(gt: COCO, dets: list[dict]) -> COCO:
    """``gt.loadRes`` (it cannot take an empty list: then an empty result set)."""
    if dets:
        return _quiet(gt.loadRes, dets)
    return _coco_from_dict({"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                            "annotations": []})


def resolve_backend(backend: str = "auto") -> str:
    """``"faster"`` or ``"pycocotools"``: the engine ``backend`` (one of BACKENDS) asks for."""
    if backend not in BACKENDS:
        raise ValueError(f"COCO evaluation backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "pycocotools":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if backend == "faster":
            raise ValueError("the 'faster' COCO evaluation backend needs faster-coco-eval "
                             "(pip install faster-coco-eval); use 'pycocotools' or 'auto'") from None
        return "pycocotools"
    return "faster"


def _evaluator(gt: COCO, dets: list[dict], backend: str) -> Any:
    """A bbox COCOeval of ``backend`` over ``gt`` and ``dets`` (pycocotools results: bbox xywh, category_id)."""
    if backend == "pycocotools":
        return COCOeval(gt, _load_detections(gt, dets), iouType="bbox")
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    fast_gt = FasterCOCO()
    fast_gt.dataset = gt.dataset
    _quiet(fast_gt.createIndex)
    if dets:
        fast_dt = _quiet(fast_gt.loadRes, copy.deepcopy(dets))  # loadRes adds fields to the dicts
    else:
        fast_dt = FasterCOCO()
        fast_dt.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"],
                           "annotations": []}
        _quiet(fast_dt.createIndex)
    return COCOeval_faster(fast_gt, fast_dt, iouType="bbox", print_function=lambda *args: None)


def run_coco_eval(gt: COCO, dets: list[dict], image_ids: Sequence[int], backend: str = "auto") -> dict[str, float]:
    """COCOeval bbox on ``image_ids``; returns STAT_NAMES -> float (COCOeval's stats)."""
    unknown = sorted(set(image_ids) - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"{len(unknown)} evaluated image ids are not in the ground truth, e.g. {unknown[:5]}")
    evaluator = _evaluator(gt, dets, resolve_backend(backend))
    evaluator.params.imgIds = sorted(image_ids)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return {**{name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)},
            "AP50_per_category": ap50_per_category(evaluator)}


def ap50_per_category(evaluator: Any) -> dict[str, float]:
    """AP at IoU 0.5 (all areas, 100 detections) of each category with ground truth, by category id (a string, as
    JSON keeps it), from an accumulated COCOeval: the terms whose mean is ``AP50``, so the AP50 of a subset of the
    classes is the mean of theirs."""
    precision = np.asarray(evaluator.eval["precision"])[0, :, :, 0, -1]  # (recall thresholds, categories)
    result = {}
    for k, category in enumerate(evaluator.params.catIds):
        values = precision[:, k]
        if (values > -1).any():  # -1: no ground truth of the category
            result[str(int(category))] = float(values[values > -1].mean())
    return result


def coco_box_ap(
    predictions: Sequence[Mapping[str, Any]],
    references: Sequence[Any] | None = None,
    coco_gt: COCO | str | Path | Mapping | None = None,
    label_to_category_id: Mapping[int, int] | None = None,
    backend: str = "auto",
) -> dict[str, float]:
    """COCO box AP of ``predictions`` (see the module docstring for every format and the ``backend``).

    Ground truth: ``coco_gt`` if given (``references`` may then be image ids or omitted),
    otherwise the per-image GT dicts in ``references``.
    """
    predictions = deduplicate_by_image_id(predictions)
    references = deduplicate_by_image_id(references or [])
    if label_to_category_id is not None:  # keys may be strings after a JSON round trip (config.json)
        label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
    if coco_gt is not None:
        gt = load_coco_gt(coco_gt)
    elif references and all(isinstance(r, Mapping) for r in references):
        gt = coco_gt_from_references(references)
    else:
        raise ValueError("give the ground truth: per-image reference dicts, or coco_gt (COCO object / json path)")
    image_ids = sorted({image_id_of(p) for p in predictions} | {image_id_of(r) for r in references})
    stats = run_coco_eval(gt, detections_from_predictions(predictions, label_to_category_id), image_ids, backend)
    return {**stats, "num_images": len(image_ids)}


class CocoDetectionMetric(evaluate.Metric):
    """``evaluate`` wrapper of :func:`coco_box_ap` (inputs and outputs: module docstring).

    ``references`` are per-image GT dicts, or image ids when ``coco_gt`` is passed to ``compute``.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": _PREDICTION, "references": _REFERENCE}),
                datasets.Features({"predictions": _PREDICTION, "references": datasets.Value("int64")}),
            ],
            reference_urls=["https://github.com/cocodataset/cocoapi"],
        )

    def _compute(
        self,
        predictions: list[dict],
        references: list[Any],
        coco_gt: COCO | str | Path | Mapping | None = None,
        label_to_category_id: Mapping[int, int] | None = None,
        backend: str = "auto",
    ) -> dict[str, float]:
        return coco_box_ap(predictions, references, coco_gt, label_to_category_id, backend)
