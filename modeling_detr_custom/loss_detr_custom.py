"""DETR's set prediction loss: box operations, Hungarian matcher and set criterion.

Predictions are matched one-to-one to targets by `scipy.optimize.linear_sum_assignment`
on a cost of class probability, L1 box distance and generalised IoU, separately for every
decoder layer; the loss is cross entropy with a down-weighted "no object" class plus L1 and
GIoU on the matched boxes. Everything is batched over decoder layers: the cost matrices of
all layers reach the CPU in one transfer, and the losses of all layers are computed at once.

Box formats: `cxcywh` is (centre x, centre y, width, height), `xyxy` is (x0, y0, x1, y1);
all boxes here are normalised by the unpadded image size, i.e. in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

# ----------------------------------------------------------------------------- box operations


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019).

    Args:
        boxes1: (..., N, 4) xyxy.
        boxes2: (..., M, 4) xyxy; its leading dimensions broadcast against boxes1's (e.g. (M, 4)).
    Returns:
        (..., N, M) GIoU in [-1, 1]. Degenerate boxes (x1 < x0) give wrong values: targets are
        checked by `check_label_values`, predictions are valid by construction (sigmoid).
    """
    # Coordinates as (..., N, 1) against (..., 1, M): every intermediate is (..., N, M), no pairs of them.
    x0a, y0a, x1a, y1a = (c[..., :, None] for c in boxes1.unbind(-1))
    x0b, y0b, x1b, y1b = (c[..., None, :] for c in boxes2.unbind(-1))
    inter = ((torch.min(x1a, x1b) - torch.max(x0a, x0b)).clamp(min=0)
             * (torch.min(y1a, y1b) - torch.max(y0a, y0b)).clamp(min=0))
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    hull = ((torch.max(x1a, x1b) - torch.min(x0a, x0b)).clamp(min=0)
            * (torch.max(y1a, y1b) - torch.min(y0a, y0b)).clamp(min=0))
    return inter / union - (hull - union) / hull


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs: boxes1 (N, 4) xyxy, boxes2 (N, 4) xyxy -> (N,)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    inter = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2]))
    inter = inter.clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2]))
    hull = hull.clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


# ----------------------------------------------------------------------------- targets


def check_label_structure(labels: list[dict], batch_size: int) -> None:
    """Raise ValueError unless `labels` holds one dict per image with `class_labels` (n,) and
    `boxes` (n, 4). Shapes only: values are checked by `check_label_values` on the CPU."""
    if not isinstance(labels, (list, tuple)) or len(labels) != batch_size:
        got = len(labels) if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise ValueError(f"labels must be a list with one dict per image ({batch_size}); got {got}")
    for i, target in enumerate(labels):
        if not isinstance(target, dict) or "class_labels" not in target or "boxes" not in target:
            got = sorted(target) if isinstance(target, dict) else type(target).__name__
            raise ValueError(f"labels[{i}] must be a dict with 'class_labels' (n,) and 'boxes' (n, 4); got {got}")
        classes, boxes = target["class_labels"], target["boxes"]
        if not isinstance(classes, Tensor) or not isinstance(boxes, Tensor):
            raise ValueError(f"labels[{i}]: 'class_labels' and 'boxes' must be torch tensors ((n,) int64, (n, 4) "
                             f"float); got {type(classes).__name__} and {type(boxes).__name__}")
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise ValueError(f"labels[{i}]['class_labels'] must be integer class ids; got dtype {classes.dtype}")
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or tuple(classes.shape) != tuple(boxes.shape[:1]):
            raise ValueError(f"labels[{i}]: 'boxes' must be (n, 4) and 'class_labels' (n,); got "
                             f"{tuple(boxes.shape)} and {tuple(classes.shape)}")


def check_label_values(classes: Tensor, boxes: Tensor, sizes: list[int], num_labels: int) -> None:
    """Raise ValueError naming the image and value of a target the loss cannot use.

    Args:
        classes: (T,) class ids of all images concatenated, on the CPU; must be in [0, num_labels).
        boxes: (T, 4) normalised cxcywh on the CPU; must be in [0, 1] with w, h > 0 (NaN fails).
        sizes: number of targets of each image.
    """
    for i, (c, b) in enumerate(zip(classes.split(sizes), boxes.split(sizes))):
        bad_box = ~(((b >= 0) & (b <= 1)).all(-1) & (b[:, 2:] > 0).all(-1))
        if bad_box.any():
            raise ValueError(f"labels[{i}]['boxes'] must be normalised (cx, cy, w, h) in [0, 1] "
                             f"with w, h > 0; got {b[bad_box][0].tolist()}")
        bad_class = (c < 0) | (c >= num_labels)
        if bad_class.any():
            raise ValueError(f"labels[{i}]['class_labels'] must be in [0, {num_labels}) "
                             f"(num_labels); got {int(c[bad_class][0])}")


# ----------------------------------------------------------------------------- matcher


class HungarianMatcher(torch.nn.Module):
    """One-to-one assignment of predictions to targets, for every decoder layer at once.

    cost = class_cost * (-p[target class]) + bbox_cost * L1(cxcywh) + giou_cost * (-GIoU(xyxy)).
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0):
        super().__init__()
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, pred_boxes: Tensor, target_classes: Tensor,
                    target_boxes: Tensor) -> Tensor:
        """Matching cost of every prediction against targets.

        Args:
            logits: (L, B, Q, C + 1) class logits of L decoder layers.
            pred_boxes: (L, B, Q, 4) normalised cxcywh.
            target_classes: (T,) targets shared by every image, or (B, n) each image's own targets
                (padded to a common n).
            target_boxes: (T, 4) or (B, n, 4) normalised cxcywh, likewise.
        Returns:
            (L, B, Q, T) or (L, B, Q, n) cost.
        """
        if target_classes.ndim == 1:
            target_classes, target_boxes = target_classes[None], target_boxes[None]
        num_layers, batch, num_queries = logits.shape[:3]
        prob = logits.float().softmax(-1)
        pred_boxes = pred_boxes.float()
        index = target_classes[None, :, None, :].expand(num_layers, batch, num_queries, -1)
        cost_class = -prob.gather(-1, index)  # (L, B, Q, n)
        cost_bbox = (pred_boxes[..., :, None, :] - target_boxes[:, None, :, :]).abs().sum(-1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
        return self.bbox_cost * cost_bbox + self.class_cost * cost_class + self.giou_cost * cost_giou

    @torch.no_grad()
    def forward(self, logits: Tensor, pred_boxes: Tensor, labels: list[dict]) -> list[list[tuple]]:
        """Hungarian matching per decoder layer and image.

        Args:
            logits: (L, B, Q, C + 1); pred_boxes: (L, B, Q, 4) normalised cxcywh.
            labels: B dicts with `class_labels` (n_b,) and `boxes` (n_b, 4) normalised cxcywh.
        Returns:
            matches[l][b] = (query_indices, target_indices), two int64 CPU tensors of length
            min(Q, n_b), sorted by query index.
        """
        num_queries = logits.shape[2]
        sizes = [len(t["boxes"]) for t in labels]
        for b, n in enumerate(sizes):
            if n > num_queries:
                raise ValueError(f"image {b} has {n} target boxes but the model has only "
                                 f"{num_queries} queries (num_queries); raise num_queries")
        if sum(sizes) == 0:
            empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
            return [[empty] * len(sizes) for _ in range(logits.shape[0])]
        device = logits.device
        target_classes = torch.cat([t["class_labels"] for t in labels]).to(device)
        target_boxes = torch.cat([t["boxes"] for t in labels]).to(device, torch.float32)
        # Each image only against its own targets: (B, n_max) rows padded with a valid dummy box
        # (the padding columns are never read), B times less work than against the whole batch.
        # Classes are clamped so a bad id cannot trigger a device-side assert before it is reported.
        padded_classes = pad_sequence([t["class_labels"].to(device) for t in labels], batch_first=True)
        padded_boxes = pad_sequence([t["boxes"].to(device, torch.float32) for t in labels], batch_first=True,
                                    padding_value=0.5)
        cost = self.cost_matrix(logits, pred_boxes, padded_classes.clamp(0, logits.shape[-1] - 1),
                                padded_boxes)  # (L, B, Q, n_max)
        # One device-to-host transfer for the cost of every layer and the targets to check.
        packed = torch.cat([cost.flatten(), target_classes.float(), target_boxes.flatten()]).cpu()
        cost, classes, boxes = packed.split([cost.numel(), len(target_classes), target_boxes.numel()])
        check_label_values(classes, boxes.view(-1, 4), sizes, logits.shape[-1] - 1)
        cost = cost.view(*logits.shape[:3], -1)
        if not torch.isfinite(cost).all():
            raise ValueError("the matching cost is not finite: the model's predictions contain "
                             "NaN or Inf (check the learning rate, the inputs and the loss scale)")
        return [[self._assign(cost[layer, b, :, :n]) for b, n in enumerate(sizes)]
                for layer in range(cost.shape[0])]

    @staticmethod
    def _assign(cost: Tensor) -> tuple[Tensor, Tensor]:
        """cost: (Q, n) for one image and layer -> (query_indices, target_indices), int64."""
        rows, cols = linear_sum_assignment(cost.numpy())
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


# ----------------------------------------------------------------------------- criterion


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def global_num_boxes(labels: list[dict], device: torch.device) -> Tensor:
    """Average number of target boxes per process, clamped to >= 1: a scalar float tensor.

    Summed over all processes, divided by the world size once (transformers 5.23 divides
    twice), so N processes give the same box-loss gradients as one process with the whole batch.
    """
    # torch.full is a fill kernel; torch.tensor(..., device=cuda) would copy and wait for the GPU.
    num_boxes = torch.full((), float(sum(len(t["class_labels"]) for t in labels)), device=device)
    world_size = _world_size()
    if world_size > 1:
        torch.distributed.all_reduce(num_boxes)
    return (num_boxes / world_size).clamp(min=1)


class SetCriterion(torch.nn.Module):
    """DETR's loss: Hungarian matching, then CE + L1 + GIoU for every decoder layer."""

    def __init__(self, num_labels: int, matcher: HungarianMatcher, eos_coefficient: float = 0.1,
                 bbox_loss_coefficient: float = 5.0, giou_loss_coefficient: float = 2.0):
        super().__init__()
        self.num_labels = num_labels
        self.matcher = matcher
        self.weight_dict = {"loss_ce": 1.0, "loss_bbox": bbox_loss_coefficient,
                            "loss_giou": giou_loss_coefficient}
        class_weight = torch.ones(num_labels + 1)
        class_weight[-1] = eos_coefficient
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(self, logits: Tensor, pred_boxes: Tensor, labels: list[dict],
                num_groups: int = 1) -> tuple[Tensor, dict]:
        """Weighted total loss and its terms.

        Args:
            logits: (L, B, G * Q, C + 1) class logits of the L decoder layers used for the loss
                (the last one is the final output) for G query groups of Q queries; the last class
                is "no object".
            pred_boxes: (L, B, G * Q, 4) normalised cxcywh.
            labels: B dicts with `class_labels` (n_b,) int64 and `boxes` (n_b, 4) normalised
                cxcywh, on the device of the predictions.
            num_groups: G (Group DETR). Every group is matched one-to-one on its own, on every layer,
                and each term is the mean over groups: the loss scale of G = 1 (implementations that
                divide the box losses by G * num_boxes give the same value).
        Returns:
            (loss, loss_dict): loss is a scalar; loss_dict holds `loss_ce`, `loss_bbox`,
            `loss_giou`, `cardinality_error`, `class_error` for the last layer and
            `loss_ce_i`, `loss_bbox_i`, `loss_giou_i` for the earlier layers i = 0..L-2. The two
            logged-only errors are those of the first group, the one used at inference.
        """
        check_label_structure(labels, logits.shape[1])
        if num_groups == 1:
            return self._set_loss(logits, pred_boxes, labels)
        # groups as extra "layers": (L, B, G * Q, X) -> (L * G, B, Q, X), layer-major
        as_layers = [x.unflatten(2, (num_groups, -1)).transpose(1, 2).flatten(0, 1) for x in (logits, pred_boxes)]
        return self._set_loss(*as_layers, labels, num_groups)

    def _set_loss(self, logits: Tensor, pred_boxes: Tensor, labels: list[dict],
                  num_groups: int = 1) -> tuple[Tensor, dict]:
        """`forward` for logits (L * G, B, Q, C + 1) and pred_boxes (L * G, B, Q, 4), layer-major."""
        matches = self.matcher(logits, pred_boxes, labels)
        layer_idx, batch_idx, query_idx, target_idx = self._flatten(matches, labels, logits.device)
        num_boxes = global_num_boxes(labels, logits.device)
        target_classes = torch.cat([t["class_labels"] for t in labels]).to(logits.device)
        target_boxes = torch.cat([t["boxes"] for t in labels]).to(logits.device, torch.float32)

        loss_ce = self._loss_labels(logits, layer_idx, batch_idx, query_idx, target_classes[target_idx])
        loss_bbox, loss_giou = self._loss_boxes(pred_boxes, layer_idx, batch_idx, query_idx,
                                                target_boxes[target_idx], num_boxes)
        terms = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        if num_groups > 1:  # (L * G,) -> (L,) mean over groups
            terms = {k: v.view(-1, num_groups).mean(1) for k, v in terms.items()}
        loss = sum(self.weight_dict[k] * v.sum() for k, v in terms.items())
        terms["cardinality_error"] = self._cardinality_error(logits[::num_groups], labels)
        loss_dict = self._name_terms(terms)
        last = layer_idx == logits.shape[0] - num_groups  # the last layer's first group
        loss_dict["class_error"] = self._class_error(logits[-num_groups], batch_idx[last], query_idx[last],
                                                     target_classes[target_idx[last]])
        return loss, loss_dict

    @staticmethod
    def _flatten(matches: list[list[tuple]], labels: list[dict], device) -> tuple[Tensor, ...]:
        """Matches of every layer as four (M,) index tensors: layer, image, query, target.

        `target` indexes the targets of the whole batch concatenated.
        """
        # A constant number of ops whatever the number of (layer, image) pairs (Group DETR multiplies them).
        num_layers, batch = len(matches), len(labels)
        pairs = [pair for per_image in matches for pair in per_image]  # layer-major, L * B
        counts = torch.tensor([len(q) for q, _ in pairs])
        offsets = torch.tensor([0] + [len(t["boxes"]) for t in labels[:-1]]).cumsum(0)
        layer_idx = torch.arange(num_layers).repeat_interleave(counts.view(num_layers, batch).sum(1))
        batch_idx = torch.arange(batch).repeat(num_layers).repeat_interleave(counts)
        query_idx = torch.cat([q for q, _ in pairs])
        target_idx = torch.cat([t for _, t in pairs]) + offsets[batch_idx]
        packed = torch.stack([layer_idx, batch_idx, query_idx, target_idx])
        return tuple(packed.to(device, non_blocking=True))  # 4 x (M,)

    def _loss_labels(self, logits: Tensor, layer_idx: Tensor, batch_idx: Tensor, query_idx: Tensor,
                     matched_classes: Tensor) -> Tensor:
        """(L,) weighted-mean cross entropy per layer; unmatched queries target "no object"."""
        target = torch.full(logits.shape[:3], self.num_labels, dtype=torch.long, device=logits.device)
        target[layer_idx, batch_idx, query_idx] = matched_classes
        weight = self.class_weight.to(logits.device)
        nll = F.cross_entropy(logits.flatten(0, 2).float(), target.flatten(), weight=weight,
                              reduction="none").view(logits.shape[0], -1)  # (L, B*Q), weighted
        return nll.sum(1) / weight[target].view(logits.shape[0], -1).sum(1)

    @staticmethod
    def _loss_boxes(pred_boxes: Tensor, layer_idx: Tensor, batch_idx: Tensor, query_idx: Tensor,
                    matched_boxes: Tensor, num_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """(L,) L1 and (L,) 1 - GIoU per layer, summed over matched pairs / num_boxes."""
        num_layers = pred_boxes.shape[0]
        src = pred_boxes[layer_idx, batch_idx, query_idx].float()  # (M, 4)
        l1 = (src - matched_boxes).abs().sum(-1)
        giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(matched_boxes))
        zeros = pred_boxes.new_zeros(num_layers, dtype=torch.float32)
        return (zeros.index_add(0, layer_idx, l1) / num_boxes,
                zeros.index_add(0, layer_idx, giou) / num_boxes)

    @staticmethod
    def _name_terms(terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """{name: (L,)} -> {name: last layer, name_i: layer i} as in the original code."""
        named = {}
        for name, per_layer in terms.items():
            named[name] = per_layer[-1]
            for i in range(per_layer.shape[0] - 1):
                named[f"{name}_{i}"] = per_layer[i]
        return named

    @staticmethod
    @torch.no_grad()
    def _cardinality_error(logits: Tensor, labels: list[dict]) -> Tensor:
        """(L,) mean |number of non-"no object" predictions - number of targets| per layer (logged only)."""
        counts = torch.tensor([len(t["class_labels"]) for t in labels])
        counts = counts.to(logits.device, non_blocking=True)  # a blocking copy would wait for the GPU
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1)  # (L, B)
        return (predicted.float() - counts.float()).abs().mean(-1)

    @staticmethod
    @torch.no_grad()
    def _class_error(logits: Tensor, batch_idx: Tensor, query_idx: Tensor, matched_classes: Tensor) -> Tensor:
        """100 - accuracy (%) of the matched predictions of the last layer (logged only).

        logits: (B, Q, C + 1); batch_idx, query_idx, matched_classes: (M,) its matched pairs.
        """
        if len(batch_idx) == 0:
            return logits.new_zeros((), dtype=torch.float32)
        matched = logits[batch_idx, query_idx]
        return 100 - (matched.argmax(-1) == matched_classes).float().mean() * 100
