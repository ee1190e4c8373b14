"""Pure functions: bounding-box conversions, areas, IoU and generalised IoU (DETR's box_ops).

Boxes are `[..., 4]`: `(cx, cy, w, h)` ("cxcywh") or corners `(x0, y0, x1, y1)` ("xyxy").
Axis legend: N and M numbers of boxes.

Unlike DETR's `util/box_ops.py`, which divides by zero for zero-area boxes (NaN), a zero union
gives an IoU of 0 and a zero enclosing area gives no enclosing penalty, so values and
gradients stay finite for degenerate boxes. DETR asserts `x1 >= x0` inside
`generalized_box_iou`; a traced function cannot, so that is left to the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "generalized_box_iou_loss",
]


def _check_boxes(name: str, boxes: jax.Array, rank: int | None = None) -> None:
    """Raises ValueError unless `boxes` is `[..., 4]` (and of rank `rank` when given)."""
    shape = tuple(boxes.shape)
    if boxes.ndim == 0 or shape[-1] != 4:
        raise ValueError(f"{name} must have a last dimension of 4 ([..., 4]), got shape {shape}")
    if rank is not None and boxes.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ([N, 4]), got shape {shape}")


def _check_pair(boxes1: jax.Array, boxes2: jax.Array, pairwise: bool) -> None:
    rank = 2 if pairwise else None
    _check_boxes("boxes1", boxes1, rank)
    _check_boxes("boxes2", boxes2, rank)
    if pairwise:
        return
    try:
        np.broadcast_shapes(boxes1.shape[:-1], boxes2.shape[:-1])
    except ValueError:
        raise ValueError(
            f"boxes1 and boxes2 must be broadcastable against each other ([..., 4], box by "
            f"box), got shapes {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        ) from None


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0, with finite gradients on both branches."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """`(cx, cy, w, h)` `[..., 4]` -> corners `(x0, y0, x1, y1)` `[..., 4]`."""
    _check_boxes("boxes", boxes)
    centre, size = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """Corners `(x0, y0, x1, y1)` `[..., 4]` -> `(cx, cy, w, h)` `[..., 4]`."""
    _check_boxes("boxes", boxes)
    low, high = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([(low + high) / 2, high - low], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """Area `(x1 - x0) * (y1 - y0)` of corner boxes `[..., 4]` -> `[...]` (negative if flipped)."""
    _check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _extent_area(low: jax.Array, high: jax.Array) -> jax.Array:
    """Area of the rectangle from corner `low` to `high` `[..., 2]`, 0 where they do not overlap."""
    wh = jnp.maximum(high - low, 0)
    return wh[..., 0] * wh[..., 1]


def _iou_union(b1: jax.Array, b2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """IoU and union area of broadcastable corner boxes `[..., 4]` -> `[...]` each."""
    low = jnp.maximum(b1[..., :2], b2[..., :2])
    inter = _extent_area(low, jnp.minimum(b1[..., 2:], b2[..., 2:]))
    union = box_area(b1) + box_area(b2) - inter
    return _safe_div(inter, union), union


def _giou(b1: jax.Array, b2: jax.Array) -> jax.Array:
    """Generalised IoU of broadcastable corner boxes `[..., 4]` -> `[...]`."""
    iou, union = _iou_union(b1, b2)
    low = jnp.minimum(b1[..., :2], b2[..., :2])
    hull = _extent_area(low, jnp.maximum(b1[..., 2:], b2[..., 2:]))
    return iou - _safe_div(hull - union, hull)


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Pairwise intersection over union of corner boxes.

    Args:
      boxes1: `[N, 4]` as `(x0, y0, x1, y1)`.
      boxes2: `[M, 4]` as `(x0, y0, x1, y1)`.

    Returns:
      `[N, M]`: `|b1 & b2| / |b1 | b2|`, in [0, 1]; 0 where the union is empty.

    Raises:
      ValueError: if either is not of shape `[N, 4]`.
    """
    _check_pair(boxes1, boxes2, pairwise=True)
    return _iou_union(boxes1[:, None], boxes2[None])[0]


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Pairwise generalised IoU (Rezatofighi et al., CVPR 2019) of corner boxes.

    `giou = iou - |C - (b1 | b2)| / |C|` with C the smallest box enclosing both: 1 for identical
    boxes, in (-1, 0] for disjoint ones, tending to -1 as they move apart.

    Args:
      boxes1: `[N, 4]` as `(x0, y0, x1, y1)`.
      boxes2: `[M, 4]` as `(x0, y0, x1, y1)`.

    Returns:
      `[N, M]` in [-1, 1].

    Raises:
      ValueError: if either is not of shape `[N, 4]`.
    """
    _check_pair(boxes1, boxes2, pairwise=True)
    return _giou(boxes1[:, None], boxes2[None])


def generalized_box_iou_loss(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """`1 - giou` of corresponding corner boxes, element by element (no reduction).

    DETR's loss_giou is `1 - diag(generalized_box_iou(src, tgt))`; this computes only the
    diagonal.

    Args:
      boxes1: `[..., 4]` as `(x0, y0, x1, y1)`.
      boxes2: `[..., 4]`, broadcastable against `boxes1`.

    Returns:
      `[...]` in [0, 2].

    Raises:
      ValueError: if either last dimension is not 4, or the boxes do not broadcast.
    """
    _check_pair(boxes1, boxes2, pairwise=False)
    return 1 - _giou(boxes1, boxes2)
