"""The levels of multi-scale deformable attention, the pixel coordinates of its sample points,
and the XLA path of `deformable_attention.ms_deform_attn` (the public function, its checks and
its Pallas path are in `functional.deformable_attention`).

The XLA path computes every point's corner rows and bilinear weights once (`_points`), then
walks the queries in chunks: for each, it gathers the upper and the lower pair of horizontal
neighbours of every point (two-row slices of the flattened values) and reduces them with a dot.
Its hand-written VJP takes the corners and weights from the forward pass, scatter-adds the value
gradient (one scatter a corner) and takes the location and weight gradients from the channel dot
products of the corners with the output gradient. The largest intermediates are the points'
rows and weights (56 bytes a point) and one chunk's sampled values (no one-hot over the
levels, no `[B, Q, N, L, P, D]` array).

Axis legend: B batch, S keys (the L levels' H_l * W_l pixels, flattened level after level, row
by row), Q queries, N heads, D channels per head, L levels, P points per head and level.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_attention.functional.sampling import corner_dots, grid_gradient

__all__ = ["SpatialShapes", "batch_index", "check_spatial_shapes", "head_major",
           "level_start_index", "locate", "ms_deform_attn_xla"]


@jax.tree_util.register_static
class SpatialShapes(tuple):
    """The levels' (H_l, W_l) as a tuple of int pairs that JAX transformations treat as static
    (a pytree without leaves): it can be passed through `jax.jit`, `jax.eval_shape` or a
    module's `apply` as an ordinary argument, where a plain tuple of ints would be traced."""


def check_spatial_shapes(spatial_shapes) -> SpatialShapes:
    """`spatial_shapes` (a sequence of (H_l, W_l) pairs of positive ints) as `SpatialShapes`.

    Raises:
      ValueError: anything else (an empty sequence, a pair that is not two positive ints, traced
        values).
    """
    try:
        shapes = tuple(tuple(operator.index(s) for s in hw) for hw in spatial_shapes)
    except TypeError:
        shapes = ()
    if not shapes or any(len(hw) != 2 or min(hw) < 1 for hw in shapes):
        raise ValueError("spatial_shapes must be a non-empty sequence of (height, width) pairs "
                         f"of positive ints, got {spatial_shapes!r}")
    return SpatialShapes(shapes)


def level_start_index(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
    """The offset of each level in the flattened keys (Deformable DETR's
    `level_start_index`), `[L]`."""
    sizes = [h * w for h, w in spatial_shapes]
    return tuple(int(s) for s in np.cumsum([0, *sizes[:-1]]))


# --- Coordinates: locations -> corner rows of the values and bilinear weights. -------------------


def _level_sizes(spatial_shapes: SpatialShapes) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths `[L, 1]` (float32), to broadcast against `[..., L, P]`."""
    sizes = np.asarray(spatial_shapes, np.float32)
    return sizes[:, :1], sizes[:, 1:]


def locate(locations: jax.Array, spatial_shapes: SpatialShapes):
    """Top-left corners y0, x0 `[..., L, P]` (int32) and the distances dy, dx to them, in
    float32. The pixel coordinates are computed as torch's `grid_sample` computes them from
    Deformable DETR's grid `2 * loc - 1` (so that `floor` rounds alike on pixel centres), and
    clamped to [-2, size] (as `spatial`'s "zeros" padding), which changes no value and keeps
    the corners' indices bounded."""
    heights, widths = _level_sizes(spatial_shapes)
    grid = 2 * locations.astype(jnp.promote_types(locations.dtype, jnp.float32)) - 1
    iy = jnp.clip(((grid[..., 1] + 1) * heights - 1) / 2, -2, heights)
    ix = jnp.clip(((grid[..., 0] + 1) * widths - 1) / 2, -2, widths)
    y0, x0 = lax.stop_gradient(jnp.floor(iy)), lax.stop_gradient(jnp.floor(ix))
    return y0.astype(jnp.int32), x0.astype(jnp.int32), iy - y0, ix - x0


def head_major(value: jax.Array) -> jax.Array:
    """`[B, S, N, D]` -> `[B * N * S, D]`, the layout of `_corners`' rows."""
    return value.transpose(0, 2, 1, 3).reshape(-1, value.shape[-1])


# One slice of two rows (a pair of horizontal neighbours) of `[R, D]` per start row.
_PAIR = lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(),
                                   start_index_map=(0,))


def _padded_values(value: jax.Array) -> jax.Array:
    """`[B, S, N, D]` -> `[B * N * S + 2, D]` in at least float32: `head_major` between two
    zero rows (`_corner_values`' input)."""
    flat = head_major(value).astype(jnp.promote_types(value.dtype, jnp.float32))
    return jnp.pad(flat, ((1, 1), (0, 0)))


def batch_index(batch: int, queries: int) -> jax.Array:
    """The batch entry `[B * Q]` of each query of the flattened `[B * Q, ...]` inputs."""
    return jnp.repeat(jnp.arange(batch, dtype=jnp.int32), queries)


# --- XLA: the queries in chunks (two gathers each), and the hand-written VJP. ----------------
# XLA materialises a gather before reducing it; in chunks of queries the gathered values stay in
# cache. Sample points per chunk: at most this many (and at least one query). Measured on a
# shared 2-core CPU at the encoder size of `benchmarks/deformable_attention.py` (4096 points:
# 32 queries, 512 KiB of gathered values a corner): 2**12 about 2x faster than 2**16, forward
# and backward.
_CHUNK_ELEMENTS = 2**12


def _chunked(locations: jax.Array, *inputs: jax.Array) -> tuple[jax.Array, ...]:
    """Each query's batch entry and the inputs `[B, Q, ...]` (locations `[B, Q, N, L, P, 2]`
    first) flattened to `[B * Q, ...]` and split into chunks of c queries, `[B * Q / c, c, ...]`
    (zero-padded: padded queries have zero weights)."""
    b, q, n, levels, points, _ = locations.shape
    count = b * q
    size = max(1, min(count, _CHUNK_ELEMENTS // (n * levels * points)))
    pad = -count % size

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(count, *x.shape[2:])
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, size, *x.shape[1:])

    return split(batch_index(b, q).reshape(b, q)), *(split(x) for x in (locations, *inputs))


def _unchunked(x: jax.Array, batch: int, queries: int) -> jax.Array:
    """`[chunks, c, ...]` -> `[B, Q, ...]`, without the padding."""
    return x.reshape(-1, *x.shape[2:])[:batch * queries].reshape(batch, queries, *x.shape[2:])


def _pair_rows_and_weights(spatial_shapes: SpatialShapes, heads: int, rows: int,
                           batch: jax.Array, locations: jax.Array):
    """For the locations `[c, N, L, P, 2]` of a chunk of c queries of the batch entries `batch`
    `[c]`: the start rows `[c, N, L, P]` of the upper and of the lower pair of horizontal
    neighbours ((y0, x0), (y0, x0 + 1), then y0 + 1) in the values with a zero row before and
    after (`_padded_values`, `rows` rows); for each pair, its two members' bilinear weights
    `[c, N, L, P, 2]` (0 outside the level) and whether each is inside its level (a corner
    outside reads some other value); the distances dy, dx `[c, N, L, P]` to the top-left one.

    Built per point and broadcast over a pair's two members, never stacked: XLA:CPU emits a
    stack of the four corners as a scalar loop that recomputes every corner's coordinates (the
    forward ran 1.3x faster without it)."""
    y0, x0, dy, dx = locate(locations, spatial_shapes)
    heights, widths = (np.asarray(a, np.int32)[:, None] for a in zip(*spatial_shapes,
                                                                     strict=True))
    starts = np.asarray(level_start_index(spatial_shapes), np.int32)[:, None]
    keys = int(starts[-1, 0] + heights[-1, 0] * widths[-1, 0])
    image = batch[:, None] * heads + jnp.arange(heads, dtype=jnp.int32)  # [c, N]
    left = image[:, :, None, None] * keys + starts + 1 + x0  # + 1: the leading zero row
    member = jnp.arange(2, dtype=jnp.int32)
    x = x0[..., None] + member
    inside_x = (x >= 0) & (x < widths[..., None])
    weight_x = jnp.abs(1 - member - dx[..., None])
    tops, weights, insides = [], [], []
    for y, weight_y in ((y0, 1 - dy), (y0 + 1, dy)):
        tops.append(jnp.clip(left + jnp.clip(y, 0, heights - 1) * widths, 0, rows - 2))
        insides.append(inside_x & ((y >= 0) & (y < heights))[..., None])
        weights.append(jnp.where(insides[-1], weight_y[..., None] * weight_x, 0))
    return tops, weights, insides, dy, dx


def _pair_values(padded: jax.Array, top: jax.Array) -> jax.Array:
    """The values `[c * N * L * P, 2, D]` of the pairs of horizontal neighbours starting at the
    rows `top` `[c, N, L, P]` of `padded` `[R, D]`: one gather of a two-row slice per pair."""
    return lax.gather(padded, top.reshape(-1, 1), _PAIR, (2, padded.shape[1]),
                      mode="promise_in_bounds")


def _points(spatial_shapes: SpatialShapes, heads: int, rows: int, locations: jax.Array,
            attention: jax.Array):
    """`_pair_rows_and_weights` of every chunk, computed once before the chunks' scans (and
    kept by the forward pass for the backward's): the rows `[K, c, N, L, P]` of the pairs, the
    bilinear weights, the same times the attention weights, and whether each corner is inside
    (each a list of two `[K, c, N, L, P, 2]`), the distances dy, dx `[K, c, N, L, P]`, and the
    attention weights `[K, c, N, L, P]` (K chunks of c queries, `_chunked`). The weighted
    products are kept rather than formed in the scans: the backward's scatter-updates would
    recompute them per channel (measured: fwd+bwd 613 ms kept, 693 ms formed in the scan)."""
    batch, locations, attention = _chunked(locations, attention)

    def chunk(batch, locations, attention):
        tops, weights, insides, dy, dx = _pair_rows_and_weights(spatial_shapes, heads, rows,
                                                                batch, locations)
        att = attention.astype(weights[0].dtype)
        return tops, weights, [w * att[..., None] for w in weights], insides, dy, dx, att

    return jax.vmap(chunk)(batch, locations, attention)


def _sample(padded: jax.Array, tops: list[jax.Array], updates: list[jax.Array]) -> jax.Array:
    """The attention-weighted sum `[K, c, N, D]` of the pairs `tops` of `padded`, with the
    weights `updates` (`_points`), chunk by chunk."""
    n, d = tops[0].shape[2], padded.shape[1]

    def step(_, chunk):
        out = 0
        for top, weight in zip(*chunk, strict=True):
            c = top.shape[0]
            # A dot: XLA:CPU reduces it faster than a fused multiply and sum.
            out = out + jnp.einsum("cnk,cnkd->cnd", weight.reshape(c, n, -1),
                                   _pair_values(padded, top).reshape(c, n, -1, d),
                                   precision=lax.Precision.HIGHEST)
        return None, out

    return lax.scan(step, None, (tops, updates))[1]


def _forward_and_points(value: jax.Array, spatial_shapes: SpatialShapes, locations: jax.Array,
                        attention: jax.Array):
    b, q, n, d = locations.shape[0], locations.shape[1], value.shape[2], value.shape[3]
    padded = _padded_values(value)
    points = _points(spatial_shapes, n, padded.shape[0], locations, attention)
    out = _sample(padded, points[0], points[2])
    return _unchunked(out, b, q).reshape(b, q, n * d).astype(value.dtype), points


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ms_deform_attn(value: jax.Array, spatial_shapes: SpatialShapes, locations: jax.Array,
                    attention: jax.Array) -> jax.Array:
    return _forward_and_points(value, spatial_shapes, locations, attention)[0]


def _ms_deform_attn_fwd(value, spatial_shapes, locations, attention):
    out, points = _forward_and_points(value, spatial_shapes, locations, attention)
    return out, (value, locations, attention, points)


def _ms_deform_attn_bwd(spatial_shapes, residuals, g):
    """Chunk by chunk, from the forward pass's `_points`: the value gradient, scatter-adds of
    the weighted output gradient into the corners' rows of one accumulator (a scatter a corner:
    one of the four stacked would be built by a loop that recomputes the weights per channel);
    the weight and location gradients, from the corners' dot products with the output
    gradient."""
    value, locations, attention, points = residuals
    b, s, n, d = value.shape
    q = locations.shape[1]
    padded = _padded_values(value)
    heights, widths = _level_sizes(spatial_shapes)
    corners = [(r, i) for r in (0, 1) for i in (0, 1)]  # nw, ne, sw, se: pair r, member i
    g = _chunked(locations, g.reshape(b, q, n, d))[-1]

    def step(d_value, chunk):
        (tops, weights, updates, insides, dy, dx, att), g = chunk
        c = g.shape[0]
        g = g.astype(padded.dtype).reshape(c, n, 1, d)
        pairs = [_pair_values(padded, top).reshape(c, n, -1, 2, d) for top in tops]
        raw = corner_dots([pair[..., i, :] for pair in pairs for i in (0, 1)], g)
        dots = tuple(jnp.where(insides[r][..., i], dot.reshape(dy.shape), 0)
                     for (r, i), dot in zip(corners, raw, strict=True))
        d_loc = att[..., None] * grid_gradient(dots, dy, dx, heights, widths)
        d_att = sum(weights[r][..., i] * dot for (r, i), dot in zip(corners, dots, strict=True))
        for r, i in corners:
            d_value = d_value.at[(tops[r] + i).reshape(-1)].add(
                (updates[r][..., i].reshape(c, n, -1, 1) * g).reshape(-1, d),
                mode="promise_in_bounds")
        return d_value, (d_loc, d_att)

    d_value, (d_loc, d_att) = lax.scan(step, jnp.zeros(padded.shape, padded.dtype), (points, g))
    d_value = d_value[1:-1].reshape(b, n, s, d).transpose(0, 2, 1, 3)
    return (d_value.astype(value.dtype), _unchunked(d_loc, b, q).astype(locations.dtype),
            _unchunked(d_att, b, q).astype(attention.dtype))


_ms_deform_attn.defvjp(_ms_deform_attn_fwd, _ms_deform_attn_bwd)
ms_deform_attn_xla = jax.jit(_ms_deform_attn, static_argnums=(1,))
