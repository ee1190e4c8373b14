"""DETR's set criterion (Carion et al., "End-to-End Object Detection with Transformers", ECCV
2020) as pure functions: minimum-cost assignment, the Hungarian matcher and the losses.

Axis legend: B batch, Q queries (predictions), T targets (ground-truth boxes, padded to a fixed
T), K object classes; logits have K + 1 entries, the last being "no object". Boxes are
`(cx, cy, w, h)` normalised to [0, 1], as DETR predicts them.

Differences from facebookresearch/detr (models/matcher.py, models/detr.py `SetCriterion`):
- The assignment is solved in JAX (shortest augmenting paths, Jonker-Volgenant style, O(T^2 Q)),
  not by scipy on the host, so matching and losses run under `jit` and `vmap`. It skips padded
  targets; `optax.assignment.hungarian_algorithm` takes no mask, and with padded targets given
  a high cost it ran up to 3x slower unpadded, 50x+ padded (`benchmarks/matcher.py`, CPU).
- Targets come padded to a static `[B, T]` with a validity mask instead of a list of
  variable-length tensors: padded targets are never matched and never counted.
- Only loss_ce, loss_bbox and loss_giou (and their auxiliary copies) are computed; DETR's
  logging-only class_error and cardinality_error are left out. `num_boxes` is this batch's
  count (clamped to at least 1); under data parallelism average it over devices yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import check_rank, check_same
from flax_attention.functional.boxes import (
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    generalized_box_iou_loss,
)

__all__ = ["DEFAULT_LOSS_WEIGHTS", "linear_assignment", "hungarian_matching", "match_cost",
           "detr_matcher", "set_criterion"]

DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = MappingProxyType({"ce": 1.0, "bbox": 5.0, "giou": 2.0})

Matcher = Callable[..., jax.Array]

# ---------------------------------------------------------------------------------------------
# Minimum-cost assignment


def _invert(assigned: jax.Array, size: int) -> jax.Array:
    """`[M]` row per column (-1: none) -> `[size]` column per row (-1: none)."""
    index = jnp.where(assigned >= 0, assigned, size)  # out of bounds: dropped
    empty = jnp.full((size,), -1, jnp.int32)
    return empty.at[index].set(jnp.arange(assigned.shape[0], dtype=jnp.int32), mode="drop")


def _shortest_path(a: jax.Array, col_ok: jax.Array, active: jax.Array, u: jax.Array,
                   v: jax.Array, p: jax.Array):
    """Dijkstra on the reduced costs `a[p[j], k] - u[j] - v[k]` from the new row `p[0]` to a free
    usable column. Row potentials are kept by column (`u[j]`: that of the row `p[j]`, column 0
    the new row), so every update is dense. Returns the updated `(u, v)`, `way` (each column's
    predecessor on the path tree) and the free column reached, or 0 (nothing to augment) when
    `active` is false or no free usable column is left (more usable rows than columns)."""
    big = jnp.finfo(a.dtype).max

    def searching(s):
        *_, j0, stuck = s
        return active & (p[j0] != 0) & ~stuck

    def step(s):
        u, v, way, minv, used, j0, _ = s
        used = used.at[j0].set(True)
        free = col_ok & ~used
        reduced = a[p[j0]] - u[j0] - v
        better = free & (reduced < minv)
        minv = jnp.where(better, reduced, minv)
        way = jnp.where(better, j0, way)
        gaps = jnp.where(free, minv, big)
        j1 = jnp.argmin(gaps).astype(jnp.int32)
        stuck = ~jnp.any(free)
        delta = jnp.where(stuck, 0, gaps[j1])
        u = jnp.where(used, u + delta, u)
        v = jnp.where(used, v - delta, v)
        minv = jnp.where(free, minv - delta, minv)
        return u, v, way, minv, used, jnp.where(stuck, 0, j1), stuck

    init = (u, v, jnp.zeros_like(p), jnp.full_like(v, big), jnp.zeros(v.shape, bool), jnp.int32(0),
            jnp.bool_(False))
    u, v, way, *_, j, _ = lax.while_loop(searching, step, init)
    return u, v, way, j


def _solve(cost: jax.Array, row_ok: jax.Array, col_ok: jax.Array) -> jax.Array:
    """Column per row `[N]` (-1: none) of a minimum-cost assignment of the usable rows, added one
    at a time, each by a shortest augmenting path (Jonker-Volgenant, O(N^2 M), with row and
    column potentials); unusable rows cost no step. Optimal when there are no more usable rows
    than usable columns, else some rows are left out, not necessarily the best ones. Entries of
    unusable rows and columns are never used."""
    n, m = cost.shape
    a = jnp.pad(cost, ((1, 0), (1, 0)))  # row 0 and column 0 are dummies
    col_ok = jnp.pad(col_ok, (1, 0))
    row_ok = jnp.pad(row_ok, (1, 0))

    def add_row(i, state):
        u, v, p = state
        p, u = p.at[0].set(i), u.at[0].set(0)
        u, v, way, j = _shortest_path(a, col_ok, row_ok[i], u, v, p)

        def flip(s):  # back along the path to column 0: each column takes its predecessor's row
            p, u, j = s
            return p.at[j].set(p[way[j]]), u.at[j].set(u[way[j]]), way[j]

        p, u, _ = lax.while_loop(lambda s: s[2] != 0, flip, (p, u, j))
        return u, v, p

    init = (jnp.zeros(m + 1, a.dtype), jnp.zeros(m + 1, a.dtype), jnp.zeros(m + 1, jnp.int32))
    p = lax.fori_loop(1, n + 1, add_row, init)[2]
    return _invert(p[1:] - 1, n)


def _assign(cost: jax.Array, row_ok: jax.Array, col_ok: jax.Array, sizes_known: tuple[bool, bool]):
    """Column per row `[N]` of a minimum-cost assignment between usable rows and columns. The
    solver needs the side with fewer usable entries as its rows: decided at trace time when the
    shapes settle it (`sizes_known`: whether each side's usable count is its full size), else by
    a `lax.cond` on the counts (under `vmap` both branches run)."""
    n, m = cost.shape

    def by_cols(c, r, k):
        return _invert(_solve(c.T, k, r), n)

    if n <= (m if sizes_known[1] else 0):
        return _solve(cost, row_ok, col_ok)
    if m <= (n if sizes_known[0] else 0):
        return by_cols(cost, row_ok, col_ok)
    return lax.cond(row_ok.sum() <= col_ok.sum(), _solve, by_cols, cost, row_ok, col_ok)


def _mask_or_ones(name: str, mask: jax.Array | None, shape: tuple[int, ...], of: str):
    if mask is None:
        return jnp.ones(shape, bool)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (the {of} of cost), "
                         f"got shape {tuple(mask.shape)}")
    return jnp.asarray(mask).astype(bool)


def linear_assignment(cost: jax.Array, row_mask: jax.Array | None = None,
                      col_mask: jax.Array | None = None) -> jax.Array:
    """A minimum-cost assignment, as the column assigned to each row.

    Matches min(#usable rows, #usable columns) pairs, each row and column at most once, with the
    smallest total cost (as scipy's `linear_sum_assignment`; ties may be broken differently). It
    jits and vmaps; the cost is not differentiated through and is solved in at least float32.

    Args:
      cost: `[N, M]`, finite where both row and column are usable (other entries are ignored).
      row_mask: `[N]`, true for rows that may be assigned; None: all.
      col_mask: `[M]`, true for columns that may be assigned; None: all.

    Returns:
      `[N]` int32: the column of each row, -1 for rows left unassigned.

    Raises:
      ValueError: `cost` not of rank 2, or a mask not of the matching length.
    """
    check_rank("cost", cost, 2, "[N, M]")
    n, m = cost.shape
    row_ok = _mask_or_ones("row_mask", row_mask, (n,), "rows")
    col_ok = _mask_or_ones("col_mask", col_mask, (m,), "columns")
    dtype = jnp.promote_types(cost.dtype, jnp.float32)
    cost = lax.stop_gradient(jnp.asarray(cost).astype(dtype))
    return _assign(cost, row_ok, col_ok, (row_mask is None, col_mask is None))


def hungarian_matching(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A minimum-cost assignment in scipy's `linear_sum_assignment` format.

    Args:
      cost: `[N, M]`, finite; N may be larger or smaller than M.

    Returns:
      `(row_indices, col_indices)`, each `[min(N, M)]` int32, sorted by row:
      `cost[row_indices, col_indices].sum()` is the minimum over all assignments.

    Raises:
      ValueError: `cost` not of rank 2.
    """
    col_of_row = linear_assignment(cost)
    rows = jnp.nonzero(col_of_row >= 0, size=min(cost.shape))[0].astype(jnp.int32)
    return rows, col_of_row[rows]


# ---------------------------------------------------------------------------------------------
# DETR's Hungarian matcher


def _check_detr_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask=None,
                       batched: bool = False) -> None:
    """Shapes of the predictions `[(B,) Q, ...]` and the (padded) targets `[(B,) T, ...]`."""
    b, lead = ("B, ", 2) if batched else ("", 1)
    check_rank("pred_logits", pred_logits, lead + 1, f"[{b}Q, K + 1]")
    check_rank("pred_boxes", pred_boxes, lead + 1, f"[{b}Q, 4]")
    check_rank("tgt_labels", tgt_labels, lead, f"[{b}T]")
    check_rank("tgt_boxes", tgt_boxes, lead + 1, f"[{b}T, 4]")
    check_same(("pred_logits", "pred_boxes"), (pred_logits.shape[:lead], pred_boxes.shape[:lead]),
               f"[{b}Q]", (pred_logits.shape, pred_boxes.shape))
    check_same(("tgt_labels", "tgt_boxes"), (tgt_labels.shape, tgt_boxes.shape[:lead]),
               f"[{b}T]", (tgt_labels.shape, tgt_boxes.shape))
    if batched:
        check_same(("pred_boxes", "tgt_boxes"), (pred_boxes.shape[0], tgt_boxes.shape[0]),
                   "batch size", (pred_boxes.shape, tgt_boxes.shape))
    for name, boxes in (("pred_boxes", pred_boxes), ("tgt_boxes", tgt_boxes)):
        if boxes.shape[-1] != 4:
            raise ValueError(f"{name} must end in 4 (cx, cy, w, h), got shape {tuple(boxes.shape)}")
    if not jnp.issubdtype(tgt_labels.dtype, jnp.integer):
        raise ValueError(f"tgt_labels must be integer class indices, got dtype {tgt_labels.dtype}")
    if tgt_mask is not None:
        check_same(("tgt_mask", "tgt_labels"), (tgt_mask.shape, tgt_labels.shape), "shape",
                   (tgt_mask.shape, tgt_labels.shape))


def match_cost(pred_logits: jax.Array, pred_boxes: jax.Array, tgt_labels: jax.Array,
               tgt_boxes: jax.Array, cost_class: float = 1.0, cost_bbox: float = 5.0,
               cost_giou: float = 2.0) -> jax.Array:
    """DETR's matching cost between the predictions and the targets of one image.

    `cost_class * (-p[q, label_t]) + cost_bbox * |box_q - box_t|_1 + cost_giou * (-giou)`, with p
    the softmax of the logits (the probability, not its log, as DETR does) and the GIoU of the
    boxes turned to corners. Computed in float32.

    Args:
      pred_logits: `[Q, K + 1]` class logits, the last one "no object".
      pred_boxes: `[Q, 4]` predicted `(cx, cy, w, h)`.
      tgt_labels: `[T]` int target classes in [0, K) (not checked: traced values).
      tgt_boxes: `[T, 4]` target `(cx, cy, w, h)`.
      cost_class, cost_bbox, cost_giou: the weights of the three terms.

    Returns:
      `[Q, T]` float32.

    Raises:
      ValueError: on wrong ranks, mismatched Q or T, a last box dimension other than 4, or
        non-integer labels.
    """
    _check_detr_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes)
    prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
    pred_boxes, tgt_boxes = pred_boxes.astype(jnp.float32), tgt_boxes.astype(jnp.float32)
    class_term = -jnp.take(prob, tgt_labels, axis=1)
    bbox_term = jnp.abs(pred_boxes[:, None] - tgt_boxes[None]).sum(-1)
    giou_term = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * bbox_term + cost_class * class_term + cost_giou * giou_term


def detr_matcher(pred_logits: jax.Array, pred_boxes: jax.Array, tgt_labels: jax.Array,
                 tgt_boxes: jax.Array, tgt_mask: jax.Array | None = None,
                 cost_class: float = 1.0, cost_bbox: float = 5.0,
                 cost_giou: float = 2.0) -> jax.Array:
    """DETR's HungarianMatcher over a batch with targets padded to a fixed T.

    Each image's `match_cost` is assigned by `linear_assignment`, using only the valid targets:
    min(Q, #valid) queries get a target, the others are "no object". With Q >= T (DETR's case:
    100 queries) the orientation is fixed at trace time; otherwise it is chosen per image.
    Not differentiated through.

    Args:
      pred_logits: `[B, Q, K + 1]`.
      pred_boxes: `[B, Q, 4]` `(cx, cy, w, h)`.
      tgt_labels: `[B, T]` int; entries of padded targets are ignored.
      tgt_boxes: `[B, T, 4]` `(cx, cy, w, h)`; entries of padded targets are ignored.
      tgt_mask: `[B, T]` bool, true for real targets; None: all are real.
      cost_class, cost_bbox, cost_giou: weights of `match_cost`.

    Returns:
      `[B, Q]` int32: the target index matched to each query, -1 for unmatched queries.
      DETR's `(index_i, index_j)` pairs of image b are `nonzero(out[b] >= 0)` and those entries.

    Raises:
      ValueError: on inconsistent shapes (see `match_cost`) or a `tgt_mask` not of shape `[B, T]`.
    """
    _check_detr_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask, batched=True)

    def one(logits, boxes, labels, targets, mask):
        cost = match_cost(logits, boxes, labels, targets, cost_class, cost_bbox, cost_giou)
        return linear_assignment(cost, col_mask=mask)

    return jax.vmap(one)(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask)


# ---------------------------------------------------------------------------------------------
# The set criterion

_LOSS_NAMES = {"ce": "loss_ce", "bbox": "loss_bbox", "giou": "loss_giou"}


def _prediction(outputs: Mapping, where: str) -> tuple[jax.Array, jax.Array]:
    missing = {"pred_logits", "pred_boxes"} - set(outputs)
    if missing:
        raise ValueError(f"{where} must hold 'pred_logits' and 'pred_boxes'; "
                         f"missing {sorted(missing)}")
    return outputs["pred_logits"], outputs["pred_boxes"]


def _check_criterion_inputs(layers, targets: Mapping, num_classes: int,
                            weights: Mapping[str, float]) -> None:
    unknown = set(weights) - set(_LOSS_NAMES)
    if unknown:
        raise ValueError(f"weights keys must be among {sorted(_LOSS_NAMES)}, got {sorted(unknown)}")
    missing = {"labels", "boxes"} - set(targets)
    if missing:
        raise ValueError(f"targets must hold 'labels' and 'boxes'; missing {sorted(missing)}")
    shapes = [(lg.shape, bx.shape) for lg, bx in layers]
    check_same([f"layer {i}" for i in range(len(layers))], shapes, "shape", shapes)
    logits, boxes = layers[0]
    _check_detr_inputs(logits, boxes, targets["labels"], targets["boxes"], targets.get("mask"),
                       batched=True)
    if logits.shape[-1] != num_classes + 1:
        raise ValueError(f"pred_logits must have num_classes + 1 = {num_classes + 1} entries "
                         f"in its last dimension, got shape {tuple(logits.shape)}")


def _decoder_losses(pred_logits: jax.Array, pred_boxes: jax.Array, labels: jax.Array,
                    boxes: jax.Array, mask: jax.Array, num_boxes: jax.Array,
                    class_weight: jax.Array, matcher: Matcher) -> dict[str, jax.Array]:
    """loss_ce, loss_bbox and loss_giou `[L]` of L decoder layers' predictions `[L, B, Q, ...]`."""
    n_layers, batch = pred_logits.shape[:2]

    def folded(x):  # [L, B, ...] -> [L * B, ...]
        return x.reshape(n_layers * batch, *x.shape[2:])

    targets = (jnp.broadcast_to(x, (n_layers, *x.shape)) for x in (labels, boxes, mask))
    match = matcher(folded(pred_logits), folded(pred_boxes), *map(folded, targets))
    match = match.reshape(n_layers, batch, -1)
    matched = match >= 0
    index = (jnp.arange(batch)[:, None], jnp.maximum(match, 0))  # into [B, T]: [L, B, Q]
    no_object = class_weight.shape[0] - 1
    classes = jnp.where(matched, labels[index], no_object)
    log_prob = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_prob, classes[..., None], axis=-1)[..., 0]
    weight = class_weight[classes]
    src, tgt = pred_boxes.astype(jnp.float32), boxes[index].astype(jnp.float32)
    l1 = jnp.where(matched[..., None], jnp.abs(src - tgt), 0).sum((1, 2, 3))
    giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    return {
        "loss_ce": (weight * nll).sum((1, 2)) / weight.sum((1, 2)),
        "loss_bbox": l1 / num_boxes,
        "loss_giou": jnp.where(matched, giou, 0).sum((1, 2)) / num_boxes,
    }


def set_criterion(outputs: Mapping, targets: Mapping, num_classes: int, eos_coef: float = 0.1,
                  weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS, aux: bool = True,
                  matcher: Matcher = detr_matcher) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DETR's SetCriterion: Hungarian matching, then classification and box losses.

    For each decoder output: queries are matched to targets by `matcher`; loss_ce is the
    cross-entropy over all B * Q queries against the matched class or "no object" (class
    `num_classes`), weighted per query by its target class's weight (1, `eos_coef` for
    "no object") and divided by the sum of those weights (torch's weighted mean); loss_bbox (L1
    of `(cx, cy, w, h)`) and loss_giou (`1 - giou`) are summed over the matched pairs and divided
    by the number of real targets in the batch (at least 1).

    Args:
      outputs: `{"pred_logits": [B, Q, K + 1], "pred_boxes": [B, Q, 4]}` and optionally
        `"aux_outputs"`: a sequence of such dicts, one per intermediate decoder layer.
      targets: `{"labels": [B, T] int, "boxes": [B, T, 4]}` `(cx, cy, w, h)` padded to T, and
        optionally `"mask": [B, T]` bool, true for real targets (None or absent: all real).
      num_classes: K, the number of object classes (the logits have K + 1).
      eos_coef: the class weight of "no object".
      weights: total = sum of `weights[k] * loss_k` over "ce", "bbox", "giou" (absent keys
        weigh 0), for the last layer and each auxiliary one alike.
      aux: include the auxiliary outputs' losses, named `loss_ce_0`, `loss_bbox_0`, ... as DETR.
      matcher: `(pred_logits, pred_boxes, labels, boxes, mask) -> [B, Q]` target per query (-1
        none), e.g. `functools.partial(detr_matcher, cost_bbox=...)`. Called once, with the
        decoder layers folded into the batch (`[L * B, ...]`), so it compiles once.

    Returns:
      `(total, losses)`: the weighted total, and a dict of float32 scalars.

    Raises:
      ValueError: on missing dict keys, inconsistent shapes, logits not of `num_classes + 1`
        entries, or unknown `weights` keys.
    """
    layers = [_prediction(outputs, "outputs")]
    if aux:
        layers += [_prediction(o, f"outputs['aux_outputs'][{i}]")
                   for i, o in enumerate(outputs.get("aux_outputs", ()))]
    _check_criterion_inputs(layers, targets, num_classes, weights)
    labels, mask = targets["labels"], targets.get("mask")
    mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    # Padded entries may hold anything (NaN boxes): give them harmless values, so that even the
    # masked-out gradients through the gathers below stay finite.
    labels = jnp.where(mask, labels, 0)
    boxes = jnp.where(mask[..., None], targets["boxes"], 0.5)
    num_boxes = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    class_weight = jnp.ones(num_classes + 1, jnp.float32).at[-1].set(eos_coef)
    per_layer = _decoder_losses(jnp.stack([lg for lg, _ in layers]),
                                jnp.stack([bx for _, bx in layers]), labels, boxes, mask,
                                num_boxes, class_weight, matcher)
    total = sum(weight * per_layer[_LOSS_NAMES[key]].sum() for key, weight in weights.items())
    losses = {name + ("" if i == 0 else f"_{i - 1}"): value[i]
              for i in range(len(layers)) for name, value in per_layer.items()}
    return jnp.asarray(total, jnp.float32), losses
