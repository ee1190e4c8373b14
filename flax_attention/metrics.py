"""Detection and segmentation scores, in numpy: COCO box mAP, mean IoU, pixel accuracy.

    scores = average_precision(predictions, dataset.labels)  # {"map", "ap50", "ap75"}
    scores = segmentation_scores(predicted, truth, num_classes)  # {"miou", ...}

`average_precision` follows pycocotools' `COCOeval` for bounding boxes with one area range
("all") and no crowd boxes: per image and class, detections sorted by descending score (at most
`max_detections`) are matched greedily, each to the unmatched ground truth box of highest IoU
at or above the threshold; the matches of all images are sorted by score (stable), precision is
made non-increasing from the right and read at the 101 recalls 0, 0.01, ..., 1 (0 past the
last recall reached); AP is the mean of those, averaged over the classes that have ground
truth (a class with ground truth and no detection scores 0). `segmentation_scores` follows the
FCN/DANet definitions: IoU per class from a confusion matrix, mean over the classes whose union
(truth or prediction) is not empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["average_precision", "box_iou", "confusion_matrix", "confusion_scores",
           "segmentation_scores", "to_xyxy"]

COCO_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # IoU 0.5:0.05:0.95, as pycocotools spells them
RECALLS = np.linspace(0.0, 1.0, 101)
Boxes = tuple[np.ndarray, ...]  # one image's (boxes, scores, classes) or (boxes, classes)


def to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h) `[..., 4]` -> corners (x0, y0, x1, y1) `[..., 4]`."""
    centre, size = boxes[..., :2], boxes[..., 2:]
    return np.concatenate([centre - size / 2, centre + size / 2], -1)


def box_iou(a: np.ndarray, b: np.ndarray, fmt: str = "cxcywh") -> np.ndarray:
    """Intersection over union of every pair of boxes.

    Args:
      a: `[N, 4]` boxes.
      b: `[M, 4]` boxes.
      fmt: "cxcywh" (DETR's centre and size) or "xyxy" (corners).

    Returns:
      `[N, M]` float64 IoU; 0 where both boxes are empty.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for name, boxes in (("a", a), ("b", b)):
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name} must be boxes [N, 4], got shape {boxes.shape}")
    if fmt not in ("cxcywh", "xyxy"):
        raise ValueError(f"fmt must be 'cxcywh' or 'xyxy', got {fmt!r}")
    if fmt == "cxcywh":
        a, b = to_xyxy(a), to_xyxy(b)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), -1)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _per_image(boxes: Sequence[Boxes] | Mapping[str, np.ndarray], name: str,
               keys: tuple[str, ...]) -> list[tuple[np.ndarray, ...]]:
    """Per-image tuples of `keys` from a sequence of tuples or a dict of padded arrays `[B, K, ...]`
    (with an optional "valid" `[B, K]` mask)."""
    if isinstance(boxes, Mapping):
        missing = [key for key in keys if key not in boxes]
        if missing:
            raise ValueError(f"{name} lacks {missing}; it has {sorted(boxes)}")
        arrays = [np.asarray(boxes[key]) for key in keys]
        valid = np.asarray(boxes.get("valid", np.ones(arrays[0].shape[:2], bool)), bool)
        return [tuple(array[i][valid[i]] for array in arrays) for i in range(len(valid))]
    out = [tuple(np.asarray(part) for part in image) for image in boxes]
    if any(len(image) != len(keys) for image in out):
        raise ValueError(f"each image of {name} must be a tuple ({', '.join(keys)})")
    return out


def _match(iou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """`[T, K]` whether each detection (rows of `iou [K, G]`, by descending score) is matched."""
    matched_truth = np.zeros((len(thresholds), iou.shape[1]), bool)
    hit = np.zeros((len(thresholds), iou.shape[0]), bool)
    for k, row in enumerate(iou):
        candidates = np.where((row >= thresholds[:, None]) & ~matched_truth, row, -1.0)
        best = iou.shape[1] - 1 - candidates[:, ::-1].argmax(1)  # the last on ties, as COCOeval
        hit[:, k] = candidates[np.arange(len(thresholds)), best] >= 0
        matched_truth[hit[:, k], best[hit[:, k]]] = True
    return hit


def _interpolated_ap(hits: np.ndarray, scores: np.ndarray, num_truth: int) -> np.ndarray:
    """`[T]` 101-point AP from the hits `[T, K]` of all detections with `scores [K]`."""
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(hits[:, order], 1)
    fp = np.cumsum(~hits[:, order], 1)
    recall = tp / num_truth
    precision = np.maximum.accumulate((tp / np.maximum(tp + fp, 1))[:, ::-1], 1)[:, ::-1]
    ap = np.zeros(len(hits))
    for t in range(len(hits)):
        at = np.searchsorted(recall[t], RECALLS, side="left")
        ap[t] = np.where(at < len(order), precision[t, np.minimum(at, len(order) - 1)], 0).mean()
    return ap


def average_precision(predictions: Sequence[Boxes] | Mapping[str, np.ndarray],
                      targets: Sequence[Boxes] | Mapping[str, np.ndarray],
                      iou_thresholds: Sequence[float] = COCO_THRESHOLDS,
                      max_detections: int = 100) -> dict[str, float]:
    """COCO-style box AP over a set of images (see the module docstring).

    Args:
      predictions: per image `(boxes [K, 4], scores [K], classes [K])`, boxes as normalised
        (cx, cy, w, h); or a dict of "boxes" `[B, K, 4]`, "scores" `[B, K]`, "classes" `[B, K]`
        and optionally "valid" `[B, K]`.
      targets: per image `(boxes [G, 4], classes [G])`, or the detection data set's dict
        ("boxes" `[B, G, 4]`, "classes" `[B, G]`, "valid" `[B, G]`).
      iou_thresholds: the thresholds that "map" averages over.
      max_detections: the most detections kept per image and class, by score.

    Returns:
      "map" (mean AP over `iou_thresholds`), "ap50" and "ap75" (AP at IoU 0.5 and 0.75); 0 when
      no image has ground truth.
    """
    predicted = _per_image(predictions, "predictions", ("boxes", "scores", "classes"))
    truth = _per_image(targets, "targets", ("boxes", "classes"))
    if len(predicted) != len(truth):
        raise ValueError(f"predictions and targets must cover the same images, got "
                         f"{len(predicted)} and {len(truth)}")
    thresholds = np.concatenate([np.asarray(iou_thresholds, np.float64), [0.5, 0.75]])
    classes = np.unique(np.concatenate([t[1] for t in truth] + [np.zeros(0, int)]))
    if not len(classes):
        return {"map": 0.0, "ap50": 0.0, "ap75": 0.0}
    per_class = np.stack([_class_ap(predicted, truth, c, thresholds, max_detections)
                          for c in classes])
    ap = per_class.mean(0)
    return {"map": float(ap[:-2].mean()), "ap50": float(ap[-2]), "ap75": float(ap[-1])}


def _class_ap(predicted: list, truth: list, c: int, thresholds: np.ndarray,
              max_detections: int) -> np.ndarray:
    """`[T]` AP of class `c` over all images."""
    hits, scores, num_truth = [], [], 0
    for (boxes, score, classes), (true_boxes, true_classes) in zip(predicted, truth, strict=True):
        mine = np.nonzero(classes == c)[0]
        mine = mine[np.argsort(-score[mine], kind="mergesort")][:max_detections]
        gt = true_boxes[true_classes == c]
        num_truth += len(gt)
        if len(mine):
            hits.append(_match(box_iou(boxes[mine], gt), thresholds) if len(gt)
                        else np.zeros((len(thresholds), len(mine)), bool))
            scores.append(score[mine])
    if not hits:
        return np.zeros(len(thresholds))
    return _interpolated_ap(np.concatenate(hits, 1), np.concatenate(scores), num_truth)


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """`[C, C]` int64 pixel counts, rows the true class, columns the predicted one.

    Args:
      predicted: `[B, H, W]` int class per pixel, in [0, num_classes).
      truth: `[B, H, W]` int; pixels outside [0, num_classes) (e.g. 255) are ignored.
      num_classes: C.

    Sum the matrices of batches for a streaming evaluation, then call `confusion_scores`.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted and truth must have the same shape [B, H, W], got "
                         f"{predicted.shape} and {truth.shape}")
    if predicted.size and not 0 <= predicted.min() <= predicted.max() < num_classes:
        raise ValueError(f"predicted must lie in [0, {num_classes}), got "
                         f"[{predicted.min()}, {predicted.max()}]")
    kept = (truth >= 0) & (truth < num_classes)
    pairs = truth[kept].astype(np.int64) * num_classes + predicted[kept]
    return np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def confusion_scores(confusion: np.ndarray) -> dict[str, float | np.ndarray]:
    """"miou", "pixel_accuracy" and "iou_per_class" `[C]` (NaN where the union is empty) of a
    confusion matrix `[C, C]`; the mean is over the classes with a non-empty union."""
    confusion = np.asarray(confusion, np.float64)
    correct = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - correct
    iou = np.where(union > 0, correct / np.where(union > 0, union, 1), np.nan)
    total = confusion.sum()
    return {"miou": float(np.nanmean(iou)) if (union > 0).any() else 0.0,
            "pixel_accuracy": float(correct.sum() / total) if total else 0.0,
            "iou_per_class": iou}


def segmentation_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int
                        ) -> dict[str, float | np.ndarray]:
    """Mean IoU, pixel accuracy and IoU per class of `[B, H, W]` label maps (see
    `confusion_matrix` and `confusion_scores`)."""
    return confusion_scores(confusion_matrix(predicted, truth, num_classes))
