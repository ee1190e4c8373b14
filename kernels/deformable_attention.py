"""Pallas kernels of multi-scale deformable attention (Deformable DETR's `MSDeformAttn` core):
a forward kernel that gathers and sums, per output row, all its weighted corner samples, and a
backward on the bilinear-sampling kernels of `kernels.bilinear`, behind one `jax.custom_vjp`,
`deformable_gather`; `deformable_gather_reference` is the same op in plain XLA.

`functional.deformable_attention` hands `deformable_gather`, for M output rows (one per batch,
query and head), the flattened values `[R, D]` (R = B * heads * S: the values of each batch and
head, their L levels one after another), and for each output row K = 4 * L * P corner samples
(4 bilinear corners of P points on L levels): their rows `rows [4, L * P, M]` (int32, all
valid) and weights `weights [4, L * P, M]` (float32: the attention weight times the bilinear
weight, 0 for a corner outside its level). It computes

    out[m, d] = sum_{k, j} weights[k, j, m] * value[rows[k, j, m], d]                  [M, D]

The coordinate math and its derivative (w.r.t. the sampling locations and attention weights,
through `weights`) stay in XLA. The backward sees each (point, output row) pair as one bilinear
sample whose output gradient is that of its row, and runs `bilinear.scatter` (the race-free
scatter-add of the value gradient; the four corners of a point on a level of width W lie within
W + 1 rows of its top-left one) and `bilinear.corner_dots` (the weight gradient), on the output
gradient repeated L * P times.

Layout: as `kernels.bilinear`, whole arrays indexed from `program_id` (the gathers are data
dependent), masked ragged edges, tiles of powers of two of at least 16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flax_attention.kernels import bilinear
from flax_attention.kernels._common import MIN_BLOCK, dtype_unsupported

__all__ = ["BlockSizes", "deformable_gather", "deformable_gather_reference", "forward",
           "unsupported"]

_CORNERS = 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward kernel (the backward uses `bilinear.BlockSizes()`), powers of
    two of at least 16.

    Attributes:
      rows: output rows (batch, query, head) per program.
      channels: the largest channel block; fewer channels D take the next power of two >= D.
      num_warps: Triton warps per program (on a GPU).
    """

    rows: int = 64
    channels: int = 64
    num_warps: int = 4

    def __post_init__(self):
        for name in ("rows", "channels"):
            size = getattr(self, name)
            if size < MIN_BLOCK or size & (size - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= {MIN_BLOCK}, "
                                 f"got {size}")

    def channel_block(self, channels: int) -> int:
        return min(self.channels, max(MIN_BLOCK, pl.next_power_of_2(channels)))


def _forward_kernel(rows_ref, weights_ref, value_ref, out_ref, *, block_rows: int,
                    channels: int):
    outs, valid = bilinear._block(pl.program_id(0), block_rows, out_ref.shape[0])
    cols, col_ok = bilinear._block(pl.program_id(1), channels, value_ref.shape[1])
    mask = valid[:, None] & col_ok[None, :]
    num_rows = out_ref.shape[0]

    def sample(k, acc):
        at = k * num_rows + outs  # rows and weights come flattened, [K * M]
        rows = plgpu.load(rows_ref.at[at], mask=valid, other=0)
        weights = plgpu.load(weights_ref.at[at], mask=valid, other=0.0)
        return acc + weights[:, None] * bilinear._load_tile(value_ref, rows, cols, mask)

    samples = rows_ref.shape[0] // num_rows
    acc = lax.fori_loop(0, samples, sample, jnp.zeros((block_rows, channels), jnp.float32))
    bilinear._store_tile(out_ref, outs, cols, acc, mask)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def forward(value: jax.Array, rows: jax.Array, weights: jax.Array,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """The weighted sums of the K corner samples of each output row.

    Args:
      value: `[R, D]`.
      rows: `[K, M]` int32 rows of `value` (all valid).
      weights: `[K, M]` float32.
      block_sizes: tile sizes.
      interpret: run the Pallas interpreter instead of compiling for the GPU.

    Returns:
      `[M, D]` in value's dtype, summed in float32.
    """
    num_rows, channels = rows.shape[1], value.shape[1]
    cb = block_sizes.channel_block(channels)
    kernel = functools.partial(_forward_kernel, block_rows=block_sizes.rows, channels=cb)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_rows, block_sizes.rows), pl.cdiv(channels, cb)),
        out_shape=jax.ShapeDtypeStruct((num_rows, channels), value.dtype),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps),
    )(rows.reshape(-1), weights.reshape(-1), value)


def unsupported(value: jax.Array, sampling_locations: jax.Array) -> str | None:
    """Why the kernels cannot take `value` `[B, S, N, D]` and `sampling_locations`
    `[B, Q, N, L, P, 2]`, or None."""
    reason = dtype_unsupported(value=value, sampling_locations=sampling_locations)
    if reason is None and sampling_locations.size == 0:
        return f"no sampling locations: shape {tuple(sampling_locations.shape)}"
    return reason


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def deformable_gather(value: jax.Array, rows: jax.Array, weights: jax.Array, span: int,
                      block_sizes: BlockSizes = BlockSizes(),
                      interpret: bool = False) -> jax.Array:
    """`forward`, differentiable (reverse mode) w.r.t. `value` and `weights`.

    Args:
      value: `[R, D]`.
      rows: `[4, J, M]` int32 rows of `value` (all valid): the four bilinear corners, in
        `kernels.bilinear`'s order, of J points for each of M output rows; every corner with a
        non-zero weight lies in `[rows[0, j, m], rows[0, j, m] + span]`.
      weights: `[4, J, M]` float32.
      span: as above; W + 1 for the corners on levels of width at most W.
      block_sizes: tile sizes of the forward kernel.
      interpret: run the Pallas interpreter instead of compiling for the GPU.

    Returns:
      `[M, D]` in value's dtype.
    """
    return forward(value, rows.reshape(-1, rows.shape[-1]),
                   weights.reshape(-1, weights.shape[-1]), block_sizes, interpret)


def _deformable_gather_fwd(value, rows, weights, span, block_sizes, interpret):
    return deformable_gather(value, rows, weights, span, block_sizes, interpret), (
        value, rows, weights)


def _deformable_gather_bwd(span, block_sizes, interpret, residuals, g):
    del block_sizes
    value, rows, weights = residuals
    points = rows.shape[1] * rows.shape[2]
    corner_rows, corner_weights = rows.reshape(_CORNERS, points), weights.reshape(_CORNERS,
                                                                                  points)
    g = jnp.broadcast_to(g, (rows.shape[1], *g.shape)).reshape(points, g.shape[-1])
    blocks = bilinear.BlockSizes()
    d_value = bilinear.scatter(corner_rows, corner_weights, g, value.shape[0], span,
                               value.dtype, blocks, interpret)
    d_weights = bilinear.corner_dots(value, corner_rows, g, blocks, interpret)
    return d_value, None, d_weights.reshape(weights.shape).astype(weights.dtype)


deformable_gather.defvjp(_deformable_gather_fwd, _deformable_gather_bwd)


def deformable_gather_reference(value: jax.Array, rows: jax.Array, weights: jax.Array
                                ) -> jax.Array:
    """What `deformable_gather` computes, by an XLA gather (summed in float32)."""
    values = value[rows].astype(jnp.float32)  # [4, J, M, D]
    return jnp.einsum("kjm,kjmd->md", weights.astype(jnp.float32), values,
                      precision=lax.Precision.HIGHEST).astype(value.dtype)
