"""COCO evaluation during training and of a saved model folder, gathered across processes; the detections picture.

Predictions handed to the metric are absolute ``(x0, y0, x1, y1)`` pixels of the ORIGINAL image with the model's
label ids, mapped to the dataset's category ids by ``label_to_category_id`` (config field, recorded by training).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from ..checks import check_finite_outputs, load_checked
from ..coco_metric import coco_box_ap, deduplicate_by_image_id, predictions_from_post_processed
from ..data import DetrCollator, find_split, metric_references, objects_as_columns, without_image_decoding
from ..drawing import detection_sheet
from ..image_processing_detr_custom import DetrCustomImageProcessor
from ..modeling_detr_custom import DetrCustomForObjectDetection
from ..outputs import EVAL_RESULTS_FILE
from ..precision import check_inference_dtype, inference_autocast
from .arguments import EvalArguments
from .data_check import check_evaluation_data
from .factories import first_rows, load_data, make_eval_dataloader

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: torch.nn.Module, dataloader: Iterable, processor: DetrCustomImageProcessor,
            accelerator: Any | None = None,
            autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> list[dict]:
    """Predictions of this process, one dict per image: ``image_id``, ``boxes`` (Q, 4) absolute xyxy pixels of
    the ORIGINAL image, ``scores`` (Q,), ``labels`` (Q,) model ids; all Q queries kept, as the original evaluates.

    Each forward runs in ``autocast()`` when given (evaluate_model.py's ``--dtype``, `precision.inference_autocast`),
    else in ``accelerator.autocast()`` (training's mixed precision), else as it is."""
    model.eval()
    if autocast is None:
        autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    predictions = []
    for batch in dataloader:
        with autocast():
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        # NaN scores would fall below any threshold: AP 0 for a broken model instead of an error
        check_finite_outputs(outputs.logits, outputs.pred_boxes, "evaluation")
        targets = [{k: v.cpu() for k, v in t.items()} for t in batch["labels"]]
        sizes = torch.stack([t["orig_size"] for t in targets])
        # threshold 0 keeps every query with a score (softmax scores are > 0 unless they underflow; the processor
        # refuses thresholds outside [0, 1] since 4fccadb)
        results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        results = [{k: v.float().cpu() for k, v in r.items()} for r in results]
        predictions += predictions_from_post_processed(results, [t["image_id"] for t in targets])
    return predictions


def gather_predictions(predictions: list[dict], accelerator: Any) -> list[dict]:
    """All processes' predictions, each image once: the duplicates that accelerate's even batches add
    at the end of a sharded eval set are removed by image id."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        predictions = gather_object(predictions)
    return deduplicate_by_image_id(predictions)


def evaluate_coco(model: torch.nn.Module, dataloader: Iterable, processor: DetrCustomImageProcessor,
                  accelerator: Any, references: list[dict], label_to_category_id: Mapping[int, int] | None,
                  backend: str = "auto",
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
    """COCO box AP (``backend``: faster-coco-eval or pycocotools) of ``model`` on ``dataloader``; the same dict
    on every process.

    ``references``: per-image GT (`data.metric_references`), category ids of the dataset;
    predicted labels are mapped to them with ``label_to_category_id``. ``autocast``: the context of each forward,
    as `predict` takes it (None: ``accelerator.autocast()``, what training uses).
    """
    predictions = gather_predictions(predict(model, dataloader, processor, accelerator, autocast), accelerator)
    result: list[Any] = [None]
    if accelerator.is_main_process:
        result[0] = coco_box_ap(predictions, references, label_to_category_id=label_to_category_id, backend=backend)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(result)
    return result[0]


@torch.no_grad()
def save_detection_picture(model: DetrCustomForObjectDetection, processor: DetrCustomImageProcessor,
                           dataset: datasets.Dataset, path: Path, num_images: int = 4, threshold: float = 0.5) -> Path:
    """Detections (score > ``threshold``) of ``model`` beside the ground truth of the first ``num_images`` rows."""
    # the collator's decoding: an unreadable file must not crash the run after training
    decoded = [DetrCollator.decode(dataset[i]) for i in range(min(num_images, len(dataset)))]
    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image, _ in decoded]
    model.eval()
    inputs = processor(images=images, return_tensors="pt", device=model.device)
    outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    sizes = torch.tensor([[im.height, im.width] for im in images])
    detections = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
    truth = [objects_as_columns(objects)["bbox"] for _, objects in decoded]
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    detection_sheet(images, detections, id2label, ground_truth=truth).save(path)
    return Path(path)


# ----------------------------------------------------------------------------- a saved model folder


def load_model_and_processor(folder: str) -> tuple[Any, Any]:
    """The folder's model (refusing incomplete or non-finite weights) and processor (DETR's defaults if none)."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = load_checked(AutoModelForObjectDetection, folder, trust_remote_code=True)
    try:
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    except (OSError, ValueError):
        logger.warning("no image processor in %s: using DETR's defaults", folder)
        processor = DetrCustomImageProcessor()
    return model, processor


def results_path(args: EvalArguments) -> Path:
    """Where the results go (``--output_file``, default ``<model>/eval_results.json``); an existing file is
    refused without ``--overwrite_output_file``, before any work."""
    path = Path(args.output_file or Path(args.model) / EVAL_RESULTS_FILE)
    if path.exists() and not args.overwrite_output_file:
        raise ValueError(f"{path} exists (an earlier evaluation); pass --overwrite_output_file to replace it, or "
                         "choose another --output_file")
    return path


def evaluate_folder(args: EvalArguments) -> dict[str, Any]:
    """`scripts/evaluate_model.py`: COCO AP of a saved model folder on a dataset split (any process count).

    ``args.dtype`` "bf16" runs each forward under `precision.inference_autocast` (checked on the accelerator's
    device before the model is loaded); "fp32" leaves the forward to accelerate's mixed precision (none by
    default). The result records both, with the split, process count, model and runtime."""
    from accelerate import Accelerator

    from .job import configure_logging

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    configure_logging(accelerator)
    check_inference_dtype(args.dtype, accelerator.device)  # before the model and the data are loaded
    if args.dtype == "bf16" and accelerator.mixed_precision == "fp16":
        raise ValueError("--dtype bf16 conflicts with mixed precision fp16 (--mixed_precision or accelerate's "
                         "config); pass --mixed_precision no or bf16, or --dtype fp32")
    model, processor = load_model_and_processor(args.model)
    if args.image_size:
        processor.size = {"shortest_edge": args.image_size, "longest_edge": round(1333 * args.image_size / 800)}
    contiguous = model.config.contiguous_labels if args.contiguous_labels is None else args.contiguous_labels
    with accelerator.main_process_first():
        data = load_data(args, bool(contiguous))
    split = args.split or find_split(data.dataset, "eval")
    if split not in data.dataset:
        raise ValueError(f"split {split!r} not in the dataset; splits: {list(data.dataset)}")
    data = check_evaluation_data(args, data, split, model.config, processor)  # before any prediction
    dataset = first_rows(without_image_decoding(data.dataset[split]), args.max_eval_samples)
    # the mapping saved at training, else the dataset's
    mapping = model.config.label_to_category_id or dict(data.label_mapping.label_to_category_id)
    references = metric_references(dataset, data.label_mapping.label_to_category_id)
    loader = accelerator.prepare(make_eval_dataloader(dataset, processor, args.batch_size, args.dataloader_num_workers))
    start = time.perf_counter()
    autocast = (lambda: inference_autocast(args.dtype, accelerator.device)) if args.dtype != "fp32" else None
    result = evaluate_coco(accelerator.prepare(model), loader, processor, accelerator, references, mapping,
                           args.coco_eval_backend, autocast)
    result.update({"split": split, "num_processes": accelerator.num_processes, "model": str(args.model),
                   "dtype": args.dtype, "mixed_precision": accelerator.mixed_precision,
                   "eval_runtime_s": round(time.perf_counter() - start, 2)})
    return result


def write_results(result: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2))
