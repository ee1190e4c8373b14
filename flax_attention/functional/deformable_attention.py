"""Pure functions: multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021).

`ms_deform_attn` equals Deformable DETR's `ms_deform_attn_core_pytorch`
(fundamentalvision/Deformable-DETR, `models/ops/functions/ms_deform_attn_func.py`): each query
and head reads P points on each of L feature levels, bilinearly (torch's `grid_sample`,
zeros padding, `align_corners=False`: a location (x, y) in [0, 1] is the pixel
(x * W_l - 0.5, y * H_l - 0.5) of level l), and sums them with its attention weights. Gradients
follow `grid_sample`'s conventions (`functional.spatial`): a coordinate on a pixel takes its
slope from the pixel to its right/below, and a corner outside its level counts 0.

Two paths share the coordinates of `functional._xla_deformable_attention`: XLA (gathers over
chunks of queries, with a hand-written VJP; described there), and Pallas
(`flax_attention.kernels.deformable_attention`), whose kernel runs the gathers.

Axis legend: B batch, S keys (the L levels' H_l * W_l pixels, flattened level after level, row
by row), Q queries, N heads, D channels per head, L levels, P points per head and level.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention._checks import as_float, check_nonempty, check_rank
from flax_attention.functional._xla_deformable_attention import (
    SpatialShapes,
    batch_index,
    check_spatial_shapes,
    head_major,
    level_start_index,
    locate,
    ms_deform_attn_xla,
)
from flax_attention.functional.sampling import corner_weights
from flax_attention.kernels import deformable_attention as kernel
from flax_attention.kernels._common import on_gpu, pick_implementation

__all__ = ["IMPLEMENTATIONS", "SpatialShapes", "check_spatial_shapes", "get_reference_points",
           "level_start_index", "ms_deform_attn"]

IMPLEMENTATIONS = ("xla", "pallas", None)  # of `ms_deform_attn`


def _check(value, spatial_shapes, sampling_locations, attention_weights) -> SpatialShapes:
    check_rank("value", value, 4, "[B, S, N, D]")
    check_nonempty("value", value, "[B, S, N, D]")
    shapes = check_spatial_shapes(spatial_shapes)
    keys = sum(h * w for h, w in shapes)
    if value.shape[1] != keys:
        raise ValueError(f"value must have S = sum of H_l * W_l = {keys} keys for spatial_shapes "
                         f"{shapes}, got value of shape {tuple(value.shape)}")
    check_rank("sampling_locations", sampling_locations, 6, "[B, Q, N, L, P, 2]")
    b, _, n, _ = value.shape
    want = (b, sampling_locations.shape[1], n, len(shapes), sampling_locations.shape[4], 2)
    if sampling_locations.shape != want:
        raise ValueError(f"sampling_locations must have shape [B, Q, N, L, P, 2] = {want} for "
                         f"value {tuple(value.shape)} and {len(shapes)} levels, got "
                         f"{tuple(sampling_locations.shape)}")
    if attention_weights.shape != want[:-1]:
        raise ValueError(f"attention_weights must have shape [B, Q, N, L, P] = {want[:-1]} for "
                         f"sampling_locations {tuple(sampling_locations.shape)}, got "
                         f"{tuple(attention_weights.shape)}")
    return shapes


def get_reference_points(spatial_shapes, valid_ratios: jax.Array) -> jax.Array:
    """The encoder's reference points (Deformable DETR's
    `DeformableTransformerEncoder.get_reference_points`): every pixel centre of every level,
    normalised by the level's valid (unpadded) size, then scaled to each level's valid ratio.

    Args:
      spatial_shapes: the levels' (H_l, W_l).
      valid_ratios: `[B, L, 2]` the (width, height) fraction of each level that is not padding.

    Returns:
      `[B, S, L, 2]` (x, y).
    """
    shapes = check_spatial_shapes(spatial_shapes)
    valid_ratios = as_float(valid_ratios)
    check_rank("valid_ratios", valid_ratios, 3, "[B, L, 2]")
    if valid_ratios.shape[1:] != (len(shapes), 2):
        raise ValueError(f"valid_ratios must have shape [B, L, 2] with L = {len(shapes)} "
                         f"levels, got {tuple(valid_ratios.shape)}")
    points = []
    for level, (h, w) in enumerate(shapes):
        ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
        ratio = valid_ratios[:, None, level]  # [B, 1, 2]
        points.append(jnp.stack([xs.reshape(-1) / w, ys.reshape(-1) / h], -1) / ratio)
    return jnp.concatenate(points, axis=1)[:, :, None] * valid_ratios[:, None]


def _corners(y0: jax.Array, x0: jax.Array, batch: jax.Array, heads: int,
             spatial_shapes: SpatialShapes) -> tuple[jax.Array, jax.Array]:
    """Rows `[4, M, N, L, P]` of the four neighbours (y0, x0), (y0, x0 + 1), (y0 + 1, x0),
    (y0 + 1, x0 + 1) of the corners `[M, N, L, P]` of M queries of the batch entries `batch`
    `[M]`, in the values flattened as `[B * N * S, D]` (each batch entry's and head's keys
    together), and whether each is inside its level (outside ones point at a clipped row)."""
    heights, widths = (np.asarray(a, np.int32)[:, None] for a in zip(*spatial_shapes,
                                                                     strict=True))
    starts = np.asarray(level_start_index(spatial_shapes), np.int32)[:, None]
    keys = int(starts[-1, 0] + heights[-1, 0] * widths[-1, 0])
    image = batch[:, None] * heads + jnp.arange(heads, dtype=jnp.int32)  # [M, N]
    first = image[:, :, None, None] * keys + starts  # [M, N, L, 1]
    rows, inside = [], []
    for y, x in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        inside.append((y >= 0) & (y < heights) & (x >= 0) & (x < widths))
        rows.append(first + jnp.clip(y, 0, heights - 1) * widths + jnp.clip(x, 0, widths - 1))
    return jnp.stack(rows), jnp.stack(inside)


# --- Pallas: XLA computes the corners and weights (autodiff gives their gradients). -------------


@functools.partial(jax.jit, static_argnums=(1, 4))
def _ms_deform_attn_pallas(value: jax.Array, spatial_shapes: SpatialShapes,
                           locations: jax.Array, attention: jax.Array,
                           interpret: bool) -> jax.Array:
    b, q, n, levels, points, _ = locations.shape
    locations = locations.reshape(b * q, n, levels, points, 2)
    y0, x0, dy, dx = locate(locations, spatial_shapes)
    rows, inside = _corners(y0, x0, batch_index(b, q), n, spatial_shapes)
    weights = jnp.where(inside, jnp.stack(corner_weights(dy, dx)) * attention.reshape(
        b * q, n, levels, points).astype(dy.dtype), 0)

    def corners_last(x: jax.Array) -> jax.Array:  # [4, M, N, L, P] -> [4, L * P, M * N]
        return x.transpose(0, 3, 4, 1, 2).reshape(4, levels * points, b * q * n)

    span = max(w for _, w in spatial_shapes) + 1
    out = kernel.deformable_gather(head_major(value), corners_last(rows),
                                   corners_last(weights.astype(jnp.float32)), span,
                                   kernel.BlockSizes(), interpret)
    return out.reshape(b, q, n * value.shape[-1])


def ms_deform_attn(value: jax.Array, spatial_shapes, sampling_locations: jax.Array,
                   attention_weights: jax.Array, *,
                   implementation: str | None = None) -> jax.Array:
    """Multi-scale deformable attention (Deformable DETR's `ms_deform_attn_core_pytorch`).

    `out[b, q, n * D + d] = sum_{l, p} attention_weights[b, q, n, l, p] *
    bilinear(level l of value[b, :, n, d], sampling_locations[b, q, n, l, p])`, bilinear as
    torch's `grid_sample(..., padding_mode="zeros", align_corners=False)` at the normalised
    location `2 * loc - 1`.

    Differentiable in reverse mode w.r.t. `value`, `sampling_locations` and
    `attention_weights`, through a custom VJP (`jax.jvp` is not supported). Coordinates and sums
    are computed in at least float32 (bfloat16 inputs accumulate in float32); keys are indexed
    with int32 (B * N * S below 2**31). Each implementation is jitted with `spatial_shapes`
    static.

    Args:
      value: `[B, S, N, D]`, the L levels' values flattened level after level, each row by row.
      spatial_shapes: the levels' (H_l, W_l), a static sequence of L pairs of ints with
        sum H_l * W_l = S.
      sampling_locations: `[B, Q, N, L, P, 2]` (x, y); (0, 0) is the top-left corner of a
        level, (1, 1) its bottom-right; locations outside read zeros.
      attention_weights: `[B, Q, N, L, P]` (Deformable DETR's are a softmax over L * P).
      implementation: "xla" (gathers and a scatter-add), "pallas" (the kernels of
        `flax_attention.kernels.deformable_attention`: float32, bfloat16 or float16 inputs;
        interpreted off the GPU) or None (XLA: the kernels have not been timed on a GPU yet).

    Returns:
      `[B, Q, N * D]` in value's dtype (float32 for an integer value), heads major.

    Raises:
      ValueError: wrong ranks or shapes (naming the argument), `spatial_shapes` that do not
        sum to S, an unknown `implementation`.
    """
    value, sampling_locations = as_float(value), as_float(sampling_locations)
    attention_weights = as_float(attention_weights)
    shapes = _check(value, spatial_shapes, sampling_locations, attention_weights)
    value, sampling_locations = jnp.asarray(value), jnp.asarray(sampling_locations)
    attention_weights = jnp.asarray(attention_weights)
    reasons = {"pallas": kernel.unsupported(value, sampling_locations)}
    if pick_implementation("ms_deform_attn", implementation, IMPLEMENTATIONS,
                           reasons) == "pallas":
        return _ms_deform_attn_pallas(value, shapes, sampling_locations, attention_weights,
                                      not on_gpu())
    return ms_deform_attn_xla(value, shapes, sampling_locations, attention_weights)
