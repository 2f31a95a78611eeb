"""COCO box AP metric: perfect predictions, agreement with pycocotools, duplicates, offline evaluate.load."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from modeling_detr_custom.coco_metric import (
    STAT_NAMES,
    CocoDetectionMetric,
    coco_box_ap,
    deduplicate_by_image_id,
    image_id_of,
    predictions_from_post_processed,
)

METRIC_FILE = Path(__file__).resolve().parents[1] / "modeling_detr_custom" / "coco_metric.py"
CATS = (1, 3, 7)  # COCO-like ids with gaps


def _ground_truth(seed: int = 0, num_images: int = 24) -> dict:
    """COCO json dict: 640x480 images, 0-5 boxes of all area ranges, a few crowd regions."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id * 10, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(0, 6)):
            w, h = rng.choice([12, 20, 60, 150, 300]) * rng.uniform(0.8, 1.2, size=2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            anns.append({"id": len(anns) + 1, "image_id": image_id * 10, "category_id": int(rng.choice(CATS)),
                         "bbox": [x, y, w, h], "area": w * h * rng.uniform(0.5, 1.0),
                         "iscrowd": int(rng.random() < 0.05)})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}


def _references(gt: dict) -> list[dict]:
    refs = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        refs.append({"image_id": img["id"], "boxes": [a["bbox"] for a in anns],
                     "category_ids": [a["category_id"] for a in anns],
                     "area": [a["area"] for a in anns], "iscrowd": [a["iscrowd"] for a in anns]})
    return refs


def _xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _perfect(gt: dict) -> list[dict]:
    preds = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        preds.append({"image_id": img["id"], "boxes": [_xyxy(a["bbox"]) for a in anns], "scores": [0.9] * len(anns),
                      "labels": [a["category_id"] for a in anns]})
    return preds


def _noisy(gt: dict, seed: int = 1) -> list[dict]:
    """Jittered GT boxes, wrong labels, misses and false positives, random scores (like DETR's 100 queries)."""
    rng = np.random.default_rng(seed)
    preds = []
    for img in gt["images"]:
        boxes, scores, labels = [], [], []
        for a in (a for a in gt["annotations"] if a["image_id"] == img["id"]):
            if rng.random() < 0.15:
                continue
            x, y, w, h = a["bbox"]
            jitter = rng.normal(0, 0.1, size=4) * [w, h, w, h]
            boxes.append(_xyxy([x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]))
            labels.append(a["category_id"] if rng.random() < 0.85 else int(rng.choice(CATS)))
            scores.append(float(rng.uniform(0.3, 1.0)))
        for _ in range(rng.integers(0, 8)):
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            boxes.append([x, y, x + rng.uniform(5, 140), y + rng.uniform(5, 130)])
            labels.append(int(rng.choice(CATS)))
            scores.append(float(rng.uniform(0.0, 0.6)))
        preds.append({"image_id": img["id"], "boxes": boxes, "scores": scores, "labels": labels})
    return preds


def _pycocotools_direct(gt: dict, preds: list[dict]) -> list[float]:
    """The reference: pycocotools on the same json and detections, written the usual way."""
    dets = [{"image_id": p["image_id"], "category_id": int(lab), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s}
            for p in preds for (x0, y0, x1, y1), s, lab in zip(p["boxes"], p["scores"], p["labels"])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def _stats(result: dict) -> list[float]:
    return [result[k] for k in STAT_NAMES]


def test_perfect_predictions_give_ap_one() -> None:
    gt = _ground_truth()
    result = CocoDetectionMetric().compute(predictions=_perfect(gt), references=_references(gt))
    assert (result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
            and result["AR100"] == pytest.approx(1.0))
    assert all(result[k] == pytest.approx(1.0) for k in ("APs", "APm", "APl")), "all area ranges present"
    assert result["num_images"] == len(gt["images"])


def test_agrees_with_pycocotools_called_directly(tmp_path: Path) -> None:
    gt, preds = _ground_truth(seed=3), _noisy(_ground_truth(seed=3), seed=4)
    expected = _pycocotools_direct(gt, preds)
    assert 0.1 < expected[0] < 0.9 and expected[1] > expected[2], "a non-trivial case"
    from_refs = CocoDetectionMetric().compute(predictions=preds, references=_references(gt))
    assert _stats(from_refs) == pytest.approx(expected, abs=1e-12)
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(gt))
    ids = [img["id"] for img in gt["images"]]
    from_file = CocoDetectionMetric().compute(predictions=preds, references=ids, coco_gt=str(ann_file))
    assert _stats(from_file) == pytest.approx(expected, abs=1e-12)
    assert _stats(coco_box_ap(preds, coco_gt=gt)) == pytest.approx(expected, abs=1e-12)


def test_duplicates_do_not_change_the_result() -> None:
    gt = _ground_truth(seed=5)
    preds, refs = _noisy(gt, seed=6), _references(gt)
    clean = CocoDetectionMetric().compute(predictions=preds, references=refs)
    # accelerate's gather_for_metrics pads the last batch by repeating samples
    padded_preds, padded_refs = preds + preds[:3] + preds[-2:], refs + refs[:3] + refs[-2:]
    metric = CocoDetectionMetric()
    for start in range(0, len(padded_preds), 7):  # added in batches, as in an eval loop
        metric.add_batch(predictions=padded_preds[start:start + 7], references=padded_refs[start:start + 7])
    assert _stats(metric.compute()) == pytest.approx(_stats(clean), abs=1e-12)
    assert len(deduplicate_by_image_id(padded_preds)) == len(preds)


def test_label_mapping_and_empty_predictions() -> None:
    gt = _ground_truth(seed=7)
    preds, refs = _noisy(gt, seed=8), _references(gt)
    raw = coco_box_ap(preds, refs)
    to_label = {c: i for i, c in enumerate(CATS)}
    contiguous = [{**p, "labels": [to_label[lab] for lab in p["labels"]]} for p in preds]
    mapped = coco_box_ap(contiguous, refs,
                         label_to_category_id={str(i): c for i, c in enumerate(CATS)})  # JSON-style keys
    assert _stats(mapped) == pytest.approx(_stats(raw), abs=1e-12)
    empty = coco_box_ap([{"image_id": r["image_id"], "boxes": [], "scores": [], "labels": []} for r in refs], refs)
    assert empty["AP"] == 0.0 and empty["AR100"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_box_ap([{"image_id": 123456, "boxes": [], "scores": [], "labels": []}], coco_gt=gt)


def test_helpers_accept_tensors() -> None:
    results = [{"scores": torch.tensor([0.5]), "labels": torch.tensor([3]),
                "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}]
    preds = predictions_from_post_processed(results, [torch.tensor([42])])
    assert preds == [{"image_id": 42, "boxes": [[1.0, 2.0, 3.0, 4.0]], "scores": [0.5], "labels": [3]}]
    items = [{"image_id": torch.tensor([1])}, {"image_id": np.int64(1)}, {"image_id": 2}, 2, torch.tensor(3)]
    assert [image_id_of(d) for d in deduplicate_by_image_id(items)] == [1, 2, 3]


def test_evaluate_load_works_offline(tmp_path: Path) -> None:
    """evaluate.load(<local file>) with the Hub marked offline, in a fresh process and a fresh modules cache."""
    gt = _ground_truth(seed=9, num_images=6)
    preds = _noisy(gt, seed=10)
    (tmp_path / "inputs.json").write_text(json.dumps({"preds": preds, "refs": _references(gt)}))
    code = (
        "import socket\n"  # any network attempt fails loudly
        "def _no_network(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket.connect = _no_network\n"
        "import evaluate, json, sys\n"
        f"d = json.load(open({str(tmp_path / 'inputs.json')!r}))\n"
        f"m = evaluate.load({str(METRIC_FILE)!r})\n"
        "print(json.dumps(m.compute(predictions=d['preds'], references=d['refs'])))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert _stats(result) == pytest.approx(_pycocotools_direct(gt, preds), abs=1e-12)


@pytest.mark.parametrize("seed", [5, 6])
def test_faster_coco_eval_and_pycocotools_give_the_same_metrics(seed: int) -> None:
    """Crowd regions, images without annotations and images without detections, on both engines (issue 14)."""
    gt = _ground_truth(seed=seed, num_images=40)
    preds = _noisy(gt, seed=seed + 10)
    for pred in preds[::4]:  # every fourth image: no detections at all
        pred.update(boxes=[], scores=[], labels=[])
    assert any(a["iscrowd"] for a in gt["annotations"])
    assert {img["id"] for img in gt["images"]} - {a["image_id"] for a in gt["annotations"]}, "some images have no GT"
    faster = coco_box_ap(preds, _references(gt), backend="faster")
    reference = coco_box_ap(preds, _references(gt), backend="pycocotools")
    assert _stats(faster) == pytest.approx(_stats(reference), abs=1e-6)
    assert _stats(reference) == pytest.approx(_pycocotools_direct(gt, preds), abs=1e-12)
    assert 0.05 < reference["AP"] < 0.95, "a score that the engines could disagree on"


def test_both_engines_agree_with_no_detections_and_refuse_an_unknown_backend() -> None:
    gt = _ground_truth(seed=7, num_images=6)
    empty = [{"image_id": img["id"], "boxes": [], "scores": [], "labels": []} for img in gt["images"]]
    faster, reference = (_stats(coco_box_ap(empty, _references(gt), backend=b)) for b in ("faster", "pycocotools"))
    assert faster == reference and set(reference) <= {0.0, -1.0} and 0.0 in reference
    with pytest.raises(ValueError, match=r"one of \('auto', 'faster', 'pycocotools'\); got 'fast'"):
        coco_box_ap(empty, _references(gt), backend="fast")
