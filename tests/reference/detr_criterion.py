"""PyTorch references for DETR's box ops, Hungarian matcher and set criterion, written from the
paper (Carion et al., ECCV 2020) and the description of facebookresearch/detr.

Targets are DETR's list of per-image dicts with variable-length "labels" `[T_b]` and "boxes"
`[T_b, 4]`; the matching is an exhaustive search (exact, fine for the small sizes of the tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, 4] x [M, 4]` corner boxes -> IoU `[N, M]` and union `[N, M]`."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None] - inter
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """`[N, 4] x [M, 4]` corner boxes -> GIoU `[N, M]`: iou - (|hull| - |union|) / |hull|."""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def brute_force_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive minimum-cost assignment of `[N, M]`, scipy's output format (sorted rows)."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n < m:
        cols, rows = brute_force_assignment(cost.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    best = min(itertools.permutations(range(n), m),
               key=lambda rows: cost[list(rows), range(m)].sum())
    rows = np.asarray(best, dtype=np.int64)
    order = np.argsort(rows)
    return rows[order], np.arange(m)[order]


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
               tgt_boxes: torch.Tensor, cost_class: float = 1, cost_bbox: float = 5,
               cost_giou: float = 2) -> torch.Tensor:
    """One image: logits `[Q, K+1]`, boxes `[Q, 4]`, labels `[T]`, tgt_boxes `[T, 4]`.

    Returns the matching cost `[Q, T]`.
    """
    prob = logits.softmax(-1)
    c_class = -prob[:, labels]
    c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


Assignment = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@torch.no_grad()
def hungarian_matcher(outputs: dict, targets: list[dict],
                      assignment: Assignment = brute_force_assignment
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (query indices, target indices) of the minimum-cost matching (`assignment`:
    the exhaustive search, or DETR's `scipy.optimize.linear_sum_assignment`)."""
    return [
        assignment(match_cost(logits, boxes, t["labels"], t["boxes"]).numpy())
        for logits, boxes, t in zip(outputs["pred_logits"], outputs["pred_boxes"], targets,
                                    strict=True)
    ]


def _layer_losses(outputs: dict, targets: list[dict], num_classes: int, eos_coef: float,
                  num_boxes: float, assignment: Assignment) -> dict[str, torch.Tensor]:
    indices = hungarian_matcher(outputs, targets, assignment)
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch = np.concatenate([np.full(len(src), b) for b, (src, _) in enumerate(indices)])
    src = np.concatenate([src for src, _ in indices])
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    classes[batch, src] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices,
                                                                         strict=True)])
    weight = torch.ones(num_classes + 1)
    weight[-1] = eos_coef
    loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, weight)
    src_boxes = boxes[batch, src]
    tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    giou = generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return {
        "loss_ce": loss_ce,
        "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes,
        "loss_giou": (1 - torch.diag(giou)).sum() / num_boxes,
    }


def set_criterion(outputs: dict, targets: list[dict], num_classes: int, eos_coef: float = 0.1,
                  weights: dict | None = None, assignment: Assignment = brute_force_assignment
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DETR's SetCriterion with labels and boxes losses, auxiliary outputs suffixed `_i`
    (`assignment`: as `hungarian_matcher`'s)."""
    weights = dict(weights or {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    losses = _layer_losses(outputs, targets, num_classes, eos_coef, num_boxes, assignment)
    for i, aux in enumerate(outputs.get("aux_outputs", [])):
        layer = _layer_losses(aux, targets, num_classes, eos_coef, num_boxes, assignment)
        losses.update({f"{k}_{i}": v for k, v in layer.items()})
        weights.update({f"{k}_{i}": weights[k] for k in layer})
    return sum(v * weights[k] for k, v in losses.items()), losses
