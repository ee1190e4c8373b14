"""DETR's box ops, Hungarian matching and set criterion against exhaustive search, scipy and
PyTorch references written from the paper (tests/reference/detr_criterion.py)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from flax_attention.detr_criterion import (
    detr_matcher,
    hungarian_matching,
    linear_assignment,
    match_cost,
    set_criterion,
)
from flax_attention.functional.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_loss,
)
from tests.helpers import assert_close
from tests.reference import detr_criterion as ref

SIZE = 6  # the padded size of the masked assignment tests
BATCH = 2 * SIZE * SIZE  # their batch: one compilation serves them all
B, Q, T, K = 3, 6, 4, 3  # batch, queries, padded targets, classes of the criterion tests
COUNTS = (3, 1, 0)  # real targets per image

_assign_batch = jax.jit(jax.vmap(linear_assignment))
_match = jax.jit(hungarian_matching)
_match_batch = jax.jit(jax.vmap(hungarian_matching))
_criterion = jax.jit(functools.partial(set_criterion, num_classes=K))
_matcher = jax.jit(detr_matcher)


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """`[n, 4]` (cx, cy, w, h) well inside the unit square."""
    centre = rng.uniform(0.25, 0.75, (n, 2))
    return np.concatenate([centre, rng.uniform(0.05, 0.45, (n, 2))], -1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Box ops


def test_box_conversions_by_hand():
    cxcywh = np.array([[0.5, 0.5, 1.0, 2.0], [3.0, 1.0, 0.0, 0.5]], np.float32)
    xyxy = np.array([[0.0, -0.5, 1.0, 1.5], [3.0, 0.75, 3.0, 1.25]], np.float32)
    np.testing.assert_allclose(box_cxcywh_to_xyxy(cxcywh), xyxy)
    np.testing.assert_allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    np.testing.assert_allclose(box_area(xyxy), [2.0, 0.0])


def test_iou_and_giou_by_hand():
    unit = [0.0, 0.0, 1.0, 1.0]
    boxes2 = np.array([unit,                    # identical: iou 1, giou 1
                       [2.0, 0.0, 3.0, 1.0],    # disjoint: union 2, hull 3: giou -1/3
                       [0.5, 0.0, 1.5, 1.0],    # half overlap: 0.5 / 1.5
                       [0.0, 0.0, 2.0, 2.0],    # contains it: iou = giou = 1/4
                       [99.0, 99.0, 100.0, 100.0]], np.float32)  # far: giou -> -1
    iou = box_iou(np.array([unit], np.float32), boxes2)[0]
    giou = generalized_box_iou(np.array([unit], np.float32), boxes2)[0]
    np.testing.assert_allclose(iou, [1, 0, 1 / 3, 1 / 4, 0], rtol=1e-6)
    np.testing.assert_allclose(giou, [1, -1 / 3, 1 / 3, 1 / 4, -(1e4 - 2) / 1e4], rtol=1e-6)
    assert np.all(np.asarray(giou)[[1, 4]] < 0)


def test_box_ops_match_torch_reference():
    rng = np.random.default_rng(0)
    boxes1, boxes2 = _random_boxes(rng, 7), _random_boxes(rng, 5)
    t1, t2 = ref.box_cxcywh_to_xyxy(torch.from_numpy(boxes1)), ref.box_cxcywh_to_xyxy(
        torch.from_numpy(boxes2))
    x1, x2 = jax.jit(box_cxcywh_to_xyxy)(boxes1), jax.jit(box_cxcywh_to_xyxy)(boxes2)
    assert_close(x1, t1.numpy())
    assert_close(jax.jit(box_xyxy_to_cxcywh)(x1), ref.box_xyxy_to_cxcywh(t1).numpy())
    assert_close(jax.jit(box_area)(x1), ref.box_area(t1).numpy())
    assert_close(jax.jit(box_iou)(x1, x2), ref.box_iou(t1, t2)[0].numpy())
    giou = ref.generalized_box_iou(t1, t2).numpy()
    assert_close(jax.jit(generalized_box_iou)(x1, x2), giou)
    assert_close(jax.jit(generalized_box_iou_loss)(x1[:5], x2), 1 - np.diag(giou))


def test_degenerate_boxes_stay_finite():
    point, line = [0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.8]
    boxes = jnp.array([point, line, [0.1, 0.1, 0.4, 0.4]])

    def total(b1, b2):
        return generalized_box_iou(b1, b2).sum() + box_iou(b1, b2).sum()

    values = jax.jit(generalized_box_iou)(boxes, boxes)
    assert np.isfinite(values).all() and values[0, 0] == 0  # a point has no IoU with itself
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(boxes, boxes)
    assert all(np.isfinite(g).all() for g in grads)


def _all_box_ops(centres: jax.Array, corners: jax.Array):
    """Every box op on `(cx, cy, w, h)` `[2, 4]` and corner `[3, 4]` boxes, for check_grads."""
    boxes = box_cxcywh_to_xyxy(centres)
    return (generalized_box_iou(boxes, corners), box_iou(boxes, corners), box_area(corners),
            generalized_box_iou_loss(boxes, corners[:2]), box_xyxy_to_cxcywh(corners))


def test_box_op_gradients():
    """Away from the kinks of min/max (all coordinates distinct), in float64."""
    with jax.enable_x64(True):
        centres = jnp.array([[0.3, 0.45, 0.4, 0.5], [0.6, 0.25, 0.6, 0.4]], jnp.float64)
        corners = jnp.array([[0.2, 0.3, 0.62, 0.8], [0.65, 0.52, 0.95, 0.99],
                             [0.01, 0.6, 0.25, 0.97]], jnp.float64)
        check_grads(jax.jit(_all_box_ops), (centres, corners), order=1, modes=("rev",))


def test_box_ops_jit_vmap_and_bf16():
    rng = np.random.default_rng(1)
    b1 = box_cxcywh_to_xyxy(_random_boxes(rng, 12).reshape(3, 4, 4))
    b2 = box_cxcywh_to_xyxy(_random_boxes(rng, 6).reshape(3, 2, 4))
    eager = generalized_box_iou(b1[1], b2[1])
    np.testing.assert_allclose(jax.jit(jax.vmap(generalized_box_iou))(b1, b2)[1], eager,
                               rtol=1e-6)
    np.testing.assert_allclose(jax.jit(generalized_box_iou)(b1[1], b2[1]), eager, rtol=1e-6)
    half = jax.jit(generalized_box_iou)(b1[1].astype(jnp.bfloat16), b2[1].astype(jnp.bfloat16))
    assert np.isfinite(half.astype(np.float32)).all()
    np.testing.assert_allclose(half.astype(np.float32), eager, atol=3e-2)


# ------------------------------------------------------------------------------------------------
# Assignment


def _brute_total(cost: np.ndarray) -> float:
    rows, cols = ref.brute_force_assignment(cost)
    return float(np.asarray(cost, np.float64)[rows, cols].sum())


def _embed(sub: np.ndarray, rng: np.random.Generator):
    """`sub` at random rows/columns of a NaN-filled `[SIZE, SIZE]` with the masks that mark it."""
    n, m = sub.shape
    rows, cols = np.sort(rng.choice(SIZE, n, replace=False)), np.sort(rng.choice(SIZE, m, False))
    cost = np.full((SIZE, SIZE), np.nan, np.float32)
    cost[np.ix_(rows, cols)] = sub
    row_mask, col_mask = np.zeros(SIZE, bool), np.zeros(SIZE, bool)
    row_mask[rows], col_mask[cols] = True, True
    return cost, row_mask, col_mask


def _check_assignment(col_of_row, cost, row_mask, col_mask) -> None:
    """A valid partial assignment of the usable entries, as large as possible, and optimal."""
    col_of_row = np.asarray(col_of_row)
    rows = np.flatnonzero(col_of_row >= 0)
    cols = col_of_row[rows]
    assert row_mask[rows].all() and col_mask[cols].all() and len(set(cols)) == len(cols)
    assert len(rows) == min(row_mask.sum(), col_mask.sum())
    usable = cost[np.ix_(row_mask, col_mask)]
    np.testing.assert_allclose(cost[rows, cols].sum(), _brute_total(usable), rtol=1e-6, atol=1e-5)


def _check_masked_problems(problems) -> None:
    """`linear_assignment` on each (cost, row_mask, col_mask), vmapped over a batch of BATCH."""
    padded = problems + problems[:1] * (BATCH - len(problems))
    out = _assign_batch(*(np.stack(arrays) for arrays in zip(*padded, strict=True)))
    for col_of_row, problem in zip(out, problems, strict=False):
        _check_assignment(col_of_row, *problem)


def test_assignment_equals_brute_force_all_sizes():
    """Sizes 1..6 both ways, integer costs with ties and real ones, at random masked places."""
    rng = np.random.default_rng(0)
    subs = [rng.integers(0, 3, (n, m)) if integer else rng.standard_normal((n, m))
            for n, m in itertools.product(range(1, SIZE + 1), repeat=2) for integer in (1, 0)]
    _check_masked_problems([_embed(sub, rng) for sub in subs])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, SIZE), st.integers(1, SIZE), st.integers(0, 2**32 - 1))
def test_assignment_properties(n, m, seed):
    """Optimal for a cost and for its transpose with rows and columns shuffled."""
    rng = np.random.default_rng(seed)
    sub = rng.integers(-3, 4, (n, m)).astype(np.float32)
    shuffled = sub[rng.permutation(n)][:, rng.permutation(m)].T
    _check_masked_problems([_embed(sub, rng), _embed(shuffled, rng)])


def test_hungarian_matching_by_hand_eager_jit_vmap():
    cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]], np.float32)  # the only optimum: 1 + 2 + 2
    batched = _match_batch(np.stack([cost[::-1], cost]))
    for rows, cols in (hungarian_matching(cost), _match(cost), (batched[0][1], batched[1][1])):
        np.testing.assert_array_equal(rows, [0, 1, 2])
        np.testing.assert_array_equal(cols, [1, 0, 2])
    np.testing.assert_array_equal(batched[1][0], [2, 0, 1])  # rows reversed


@pytest.mark.parametrize("shape", [(2, 5), (5, 2)])
def test_hungarian_matching_equals_brute_force(shape):
    rng = np.random.default_rng(shape[0])
    costs = rng.integers(0, 4, (12, *shape)).astype(np.float32)
    rows, cols = _match_batch(costs)
    assert rows.shape == cols.shape == (12, min(shape))
    for cost, r, c in zip(costs, np.asarray(rows), np.asarray(cols), strict=True):
        assert (np.diff(r) > 0).all() and len(set(c)) == len(c)
        assert cost[r, c].sum() == _brute_total(cost)


@pytest.mark.parametrize("shape", [(40, 15), (15, 40)])
def test_hungarian_matching_equals_scipy(shape):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    cost = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    rows, cols = _match(cost)
    expected_rows, expected_cols = scipy_optimize.linear_sum_assignment(cost)
    np.testing.assert_allclose(cost[rows, cols].sum(), cost[expected_rows, expected_cols].sum(),
                               rtol=1e-6)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(cols, expected_cols)


def test_detr_sized_padded_assignment_equals_scipy():
    """DETR's sizes: 100 queries, 50 padded targets (NaN where padded) of which 0, 7 or 50 are
    real; every real target is matched, optimally, and no padded one."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(5)
    mask = np.arange(50) < np.array([0, 7, 50])[:, None]
    costs = np.where(mask[:, None], rng.standard_normal((3, 100, 50)), np.nan).astype(np.float32)
    assign = jax.jit(jax.vmap(lambda c, k: linear_assignment(c, col_mask=k)))
    for col_of_row, cost, real in zip(np.asarray(assign(costs, mask)), costs, mask, strict=True):
        rows = np.flatnonzero(col_of_row >= 0)
        cols = col_of_row[rows]
        assert len(rows) == real.sum() and real[cols].all() and len(set(cols)) == len(cols)
        expected = cost[:, real][scipy_optimize.linear_sum_assignment(cost[:, real])].sum()
        np.testing.assert_allclose(cost[rows, cols].sum(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# DETR matcher and criterion


def _problem(seed: int, counts=COUNTS, queries: int = Q, aux: int = 2):
    """Random predictions and padded targets (NaN boxes and label 99 where padded), as JAX
    inputs and as the reference's torch inputs (leaf tensors, list of variable-length dicts)."""
    rng = np.random.default_rng(seed)
    slots = max(T, *counts)
    layers = [(rng.standard_normal((len(counts), queries, K + 1)).astype(np.float32),
               _random_boxes(rng, len(counts) * queries).reshape(len(counts), queries, 4))
              for _ in range(aux + 1)]
    mask = np.arange(slots) < np.array(counts)[:, None]
    labels = np.where(mask, rng.integers(0, K, mask.shape), 99)
    boxes = np.where(mask[..., None], _random_boxes(rng, mask.size).reshape(*mask.shape, 4), np.nan)
    outputs = {"pred_logits": layers[-1][0], "pred_boxes": layers[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in layers[:-1]]}
    targets = {"labels": labels, "boxes": boxes.astype(np.float32), "mask": mask}
    torch_outputs = jax.tree.map(lambda a: torch.tensor(a, requires_grad=True), outputs)
    torch_targets = [{"labels": torch.from_numpy(labels[b, :n]), "boxes": torch.from_numpy(
        targets["boxes"][b, :n])} for b, n in enumerate(counts)]
    return outputs, targets, torch_outputs, torch_targets


def test_match_cost_matches_reference():
    outputs, targets, torch_outputs, torch_targets = _problem(0)
    got = jax.jit(match_cost)(outputs["pred_logits"][0], outputs["pred_boxes"][0],
                     targets["labels"][0, :3], targets["boxes"][0, :3], 2.0, 3.0, 4.0)
    expected = ref.match_cost(torch_outputs["pred_logits"][0], torch_outputs["pred_boxes"][0],
                              torch_targets[0]["labels"], torch_targets[0]["boxes"], 2, 3, 4)
    assert_close(got, expected.detach().numpy())


@pytest.mark.parametrize(("counts", "queries"), [(COUNTS, Q), ((5, 2), 3)])
def test_detr_matcher_ignores_padding(counts, queries):
    """Fewer or more queries than padded targets: padded ones are never matched, and the
    matching is optimal over the real ones."""
    outputs, targets, torch_outputs, torch_targets = _problem(1, counts, queries, aux=0)
    match = np.asarray(_matcher(outputs["pred_logits"], outputs["pred_boxes"], targets["labels"],
                                targets["boxes"], targets["mask"]))
    assert match.shape == (len(counts), queries)
    for b, n in enumerate(counts):
        rows = np.flatnonzero(match[b] >= 0)
        cols = match[b, rows]
        assert len(rows) == min(n, queries) and (cols < n).all() and len(set(cols)) == len(cols)
        cost = ref.match_cost(torch_outputs["pred_logits"][b], torch_outputs["pred_boxes"][b],
                              torch_targets[b]["labels"], torch_targets[b]["boxes"])
        cost = cost.detach().numpy()
        np.testing.assert_allclose(cost[rows, cols].sum(), _brute_total(cost), rtol=1e-5,
                                   atol=1e-5)


def test_set_criterion_matches_reference_values_and_gradients():
    outputs, targets, torch_outputs, torch_targets = _problem(2)
    (total, losses), grads = jax.value_and_grad(_criterion, has_aux=True)(outputs, targets)
    expected_total, expected = ref.set_criterion(torch_outputs, torch_targets, K)
    expected_total.backward()
    assert sorted(losses) == sorted(expected) and len(losses) == 9
    for name, value in expected.items():
        assert_close(losses[name], value.detach().numpy())
    assert_close(total, expected_total.detach().numpy())
    for got, leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(torch_outputs), strict=True):
        assert_close(got, leaf.grad.numpy(), rtol=1e-4)


def _hand_problem():
    """Two targets; queries 3 and 1 sit exactly on them, the others far off in a corner."""
    outputs, targets, *_ = _problem(3, counts=(2, 0, 0), aux=0)
    tgt = np.array([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]], np.float32)
    targets["boxes"][0, :2] = tgt
    outputs["pred_boxes"][:] = [0.95, 0.95, 0.02, 0.02]
    outputs["pred_boxes"][0, [3, 1]] = tgt
    outputs["pred_logits"][:] = 0.0  # every cross-entropy is log(K + 1)
    return outputs, targets


def test_set_criterion_by_hand():
    outputs, targets = _hand_problem()
    match = _matcher(outputs["pred_logits"], outputs["pred_boxes"], targets["labels"],
                     targets["boxes"], targets["mask"])
    np.testing.assert_array_equal(match[0], [-1, 1, -1, 0, -1, -1])
    assert (np.asarray(match[1:]) == -1).all()
    total, losses = _criterion(outputs, targets)
    np.testing.assert_allclose([losses["loss_ce"], losses["loss_bbox"], losses["loss_giou"]],
                               [np.log(K + 1), 0, 0], atol=1e-6)
    # Shift query 3 right by half its width: L1 0.1, IoU = GIoU = 1/3; two targets.
    outputs["pred_boxes"][0, 3, 0] += 0.1
    total, losses = _criterion(outputs, targets)
    np.testing.assert_allclose([losses["loss_bbox"], losses["loss_giou"]], [0.05, 1 / 3],
                               rtol=1e-5)
    np.testing.assert_allclose(total, np.log(K + 1) + 5 * 0.05 + 2 / 3, rtol=1e-5)


def test_set_criterion_without_targets():
    outputs, targets, *_ = _problem(4, aux=0)
    targets["mask"][:] = False
    total, losses = _criterion(outputs, targets)
    no_object = -jax.nn.log_softmax(outputs["pred_logits"])[..., K].mean()
    np.testing.assert_allclose(losses["loss_ce"], no_object, rtol=1e-6)
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    np.testing.assert_allclose(total, no_object, rtol=1e-6)


def _near_hand_problem():
    outputs, targets = _hand_problem()
    outputs["pred_boxes"][0, 3] += 0.03
    return outputs, targets


@pytest.mark.slow  # eager dispatch of the whole criterion: about 5 s of CPU
def test_set_criterion_jit_equals_eager():
    outputs, targets = _near_hand_problem()
    for value, expected in zip(jax.tree.leaves(_criterion(outputs, targets)),
                               jax.tree.leaves(set_criterion(outputs, targets, K)), strict=True):
        np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_set_criterion_bf16_close_to_fp32():
    outputs, targets = _near_hand_problem()
    half = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), outputs)
    for value, expected in zip(jax.tree.leaves(_criterion(half, targets)),
                               jax.tree.leaves(_criterion(outputs, targets)), strict=True):
        assert value.dtype == jnp.float32 and np.isfinite(value)
        np.testing.assert_allclose(value, expected, rtol=3e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# Bad input


def _bad_calls():
    outputs, targets, *_ = _problem(5, aux=0)
    boxes, logits = outputs["pred_boxes"], outputs["pred_logits"]
    labels, tgt, mask = targets["labels"], targets["boxes"], targets["mask"]
    return [
        (lambda: box_iou(boxes[0, :, :3], boxes[0]), r"boxes1.*\(6, 3\)"),
        (lambda: generalized_box_iou(boxes, boxes[0]), r"boxes1 must have rank 2.*\(3, 6, 4\)"),
        (lambda: generalized_box_iou_loss(boxes, tgt[..., :2]), r"boxes2.*\(3, 4, 2\)"),
        (lambda: box_cxcywh_to_xyxy(np.zeros(4)[0]), r"boxes.*got shape \(\)"),
        (lambda: hungarian_matching(np.zeros(3)), r"cost must have rank 2.*\(3,\)"),
        (lambda: linear_assignment(np.zeros((3, 2)), col_mask=np.ones(3)), r"col_mask.*\(2,\)"),
        (lambda: match_cost(logits[0], boxes[0, :5], labels[0], tgt[0]),
         r"pred_logits and pred_boxes.*\(6, 4\).*\(5, 4\)"),
        (lambda: match_cost(logits[0], boxes[0], labels[0].astype(float), tgt[0]), "integer"),
        (lambda: detr_matcher(logits[:2], boxes[:2], labels[:2], tgt[:2], mask[:2, :3]),
         r"tgt_mask and tgt_labels.*\(2, 3\).*\(2, 4\)"),
        (lambda: detr_matcher(logits, boxes, labels[:2], tgt[:2]), r"batch size.*\(3, 6, 4\)"),
        (lambda: set_criterion(outputs, targets, K + 1), r"num_classes \+ 1 = 5.*\(3, 6, 4\)"),
        (lambda: set_criterion(outputs, targets, K, weights={"l1": 1.0}), "weights keys"),
        (lambda: set_criterion({"pred_logits": logits}, targets, K), "pred_boxes"),
        (lambda: set_criterion(outputs, {"labels": labels}, K), "boxes"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises(index):
    call, message = _bad_calls()[index]
    with pytest.raises(ValueError, match=message):
        call()
