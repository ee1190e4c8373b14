"""Pallas kernels of bilinear sampling (torch's `grid_sample(mode="bilinear")`): the forward
gather, the corner dot products of the weight gradient, and the race-free scatter-add of the
image gradient, behind one `jax.custom_vjp`, `bilinear_gather`; `bilinear_gather_reference` is
the same op in plain XLA.

The coordinate math (padding modes, `align_corners`, torch's gradient conventions) stays in
`functional.spatial`, which hands `bilinear_gather`, for L sample points, the rows
`rows [4, L]` (int32) of their four neighbours in the flattened image `[R, C]` (R = B * H * W;
every row valid, an outside neighbour pointing at a clipped one) and their bilinear weights
`weights [4, L]` (float32, zero for an outside neighbour), and differentiates the weights with
respect to the grid itself. The kernels are therefore the same for every padding mode:

    gather   out[l, c]     = sum_k weights[k, l] * image[rows[k, l], c]           [L, C]
    dots     dots[k, l]    = sum_c g[l, c] * image[rows[k, l], c]                  [4, L]
    scatter  d_image[r, c] = sum_{k, l: rows[k, l] = r} weights[k, l] * g[l, c]    [R, C]

(`dots` is the cotangent of the weights, `scatter` that of the image.)

Why the scatter needs no atomics: a float atomic add makes the GPU result depend on the order
the adds land in, and Pallas's interpreter discharges `atomic_add` with array indices as a
gather-add-set, which keeps one of two colliding adds of the same call (inexact on CPU). Here
each program owns a block of P image rows and reads the sample points that touch them: the
points are sorted by their first row `rows[0]`; every non-zero corner of a point lies in
`[rows[0], rows[0] + span]` (span = W + 1 for an image of width W), so the points touching rows
`[r0, r0 + P)` are one run of the sorted order, located by a binary search beforehand. The
program walks that run in chunks of S points, builds the weight matrix `M[P, S]`
(`M[p, s] = sum_k weights[k, s] [rows[k, s] = r0 + p]`) and accumulates `M @ g[chunk]` (an fp32
"ieee" dot). Every output row is written once, by one program: deterministic, exact in
interpret mode. Work per point is about (P + span) / P chunks instead of four atomic adds.

Layout: the kernels take whole arrays (no `BlockSpec`) and index them from `program_id`, since
the gathers are data dependent; ragged edges are masked loads and stores; tile sizes are powers
of two, at least 16 (Triton's `dot`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flax_attention.kernels._common import MIN_BLOCK, dtype_unsupported

__all__ = ["BlockSizes", "bilinear_gather", "bilinear_gather_reference", "corner_dots", "gather",
           "scatter", "unsupported"]

_CORNERS = 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels, powers of two of at least 16.

    Attributes:
      samples: S, sample points per program of `gather` and `corner_dots`, and per step of the
        loop of `scatter`.
      pixels: P, image rows per program of `scatter`.
      channels: the largest channel block; fewer channels C take the next power of two >= C.
      num_warps: Triton warps per program (on a GPU).
    """

    samples: int = 64
    pixels: int = 64
    channels: int = 64
    num_warps: int = 4

    def __post_init__(self):
        for name in ("samples", "pixels", "channels"):
            size = getattr(self, name)
            if size < MIN_BLOCK or size & (size - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= {MIN_BLOCK}, "
                                 f"got {size}")

    def triton(self) -> plgpu.CompilerParams:
        """The kernels' compiler parameters: Triton (not Mosaic GPU) on a GPU."""
        return plgpu.CompilerParams(num_warps=self.num_warps)

    def channel_block(self, channels: int) -> int:
        return min(self.channels, max(MIN_BLOCK, pl.next_power_of_2(channels)))


# --- in-kernel helpers ---------------------------------------------------------------------------


def _block(program: int, size: int, limit: int) -> tuple[jax.Array, jax.Array]:
    """Indices `[size]` of the `program`-th block of `size`, and which are below `limit`."""
    index = program * size + jnp.arange(size, dtype=jnp.int32)
    return index, index < limit


def _load_tile(ref, rows: jax.Array, cols: jax.Array, mask: jax.Array) -> jax.Array:
    """`ref[rows, cols]` `[len(rows), len(cols)]` in float32, 0 where `mask` is False."""
    shape = (rows.shape[0], cols.shape[0])
    index = (jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(cols[None, :], shape))
    return plgpu.load(ref.at[index], mask=mask, other=0).astype(jnp.float32)


def _store_tile(ref, rows: jax.Array, cols: jax.Array, value: jax.Array,
                mask: jax.Array) -> None:
    shape = value.shape
    index = (jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(cols[None, :], shape))
    plgpu.store(ref.at[index], value.astype(ref.dtype), mask=mask)


def _load_corners(ref, index: jax.Array, valid: jax.Array, other) -> list[jax.Array]:
    """The four rows `ref[k, index]` of a `[4, L]` input, `other` where not `valid`."""
    return [plgpu.load(ref.at[k, index], mask=valid, other=other) for k in range(_CORNERS)]


# --- kernels -------------------------------------------------------------------------------------


def _gather_kernel(rows_ref, weights_ref, image_ref, out_ref, *, samples: int, channels: int):
    points, valid = _block(pl.program_id(0), samples, rows_ref.shape[1])
    cols, col_ok = _block(pl.program_id(1), channels, image_ref.shape[1])
    rows = _load_corners(rows_ref, points, valid, 0)
    weights = _load_corners(weights_ref, points, valid, 0.0)
    mask = valid[:, None] & col_ok[None, :]
    out = sum(w[:, None] * _load_tile(image_ref, r, cols, mask)
              for r, w in zip(rows, weights, strict=True))
    _store_tile(out_ref, points, cols, out, mask)


def _dots_kernel(rows_ref, image_ref, g_ref, dots_ref, *, samples: int, channels: int):
    points, valid = _block(pl.program_id(0), samples, rows_ref.shape[1])
    rows = _load_corners(rows_ref, points, valid, 0)

    def channel_block(j, dots):
        cols, col_ok = _block(j, channels, image_ref.shape[1])
        mask = valid[:, None] & col_ok[None, :]
        g = _load_tile(g_ref, points, cols, mask)
        return tuple(d + jnp.sum(g * _load_tile(image_ref, r, cols, mask), axis=1)
                     for d, r in zip(dots, rows, strict=True))

    zeros = (jnp.zeros((samples,), jnp.float32),) * _CORNERS
    dots = lax.fori_loop(0, pl.cdiv(image_ref.shape[1], channels), channel_block, zeros)
    for k, d in enumerate(dots):
        plgpu.store(dots_ref.at[k, points], d, mask=valid)


def _scatter_kernel(runs_ref, order_ref, rows_ref, weights_ref, g_ref, out_ref, *,
                    pixels: int, samples: int, channels: int):
    block = pl.program_id(0)
    first, stop = runs_ref[0, block], runs_ref[1, block]
    cols, col_ok = _block(pl.program_id(1), channels, g_ref.shape[1])
    pixel = jnp.arange(pixels, dtype=jnp.int32)[:, None] + block * pixels

    def chunk(step, acc):
        points, valid = _block(step, samples, stop - first)
        points = points + first
        rows = _load_corners(rows_ref, points, valid, -1)
        weights = _load_corners(weights_ref, points, valid, 0.0)
        m = sum(jnp.where(r[None, :] == pixel, w[None, :], 0.0)
                for r, w in zip(rows, weights, strict=True))
        order = plgpu.load(order_ref.at[points], mask=valid, other=0)
        g = _load_tile(g_ref, order, cols, valid[:, None] & col_ok[None, :])
        return acc + plgpu.dot(m, g, precision=lax.Precision.HIGHEST)

    steps = (stop - first + samples - 1) // samples
    acc = lax.fori_loop(0, steps, chunk, jnp.zeros((pixels, channels), jnp.float32))
    rows, row_ok = _block(block, pixels, out_ref.shape[0])
    _store_tile(out_ref, rows, cols, acc, row_ok[:, None] & col_ok[None, :])


# --- wrappers ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gather(image: jax.Array, rows: jax.Array, weights: jax.Array,
           block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """Weighted sums of four rows of `image` per sample point.

    Args:
      image: `[R, C]`, R = B * H * W.
      rows: `[4, L]` int32 rows of `image` (all valid).
      weights: `[4, L]` float32.
      block_sizes: tile sizes.
      interpret: run the Pallas interpreter instead of compiling for the GPU.

    Returns:
      `[L, C]` in image's dtype, summed in float32.
    """
    (length, channels), cb = (rows.shape[1], image.shape[1]), block_sizes.channel_block(
        image.shape[1])
    kernel = functools.partial(_gather_kernel, samples=block_sizes.samples, channels=cb)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(length, block_sizes.samples), pl.cdiv(channels, cb)),
        out_shape=jax.ShapeDtypeStruct((length, channels), image.dtype),
        interpret=interpret,
        compiler_params=block_sizes.triton(),
    )(rows, weights, image)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def corner_dots(image: jax.Array, rows: jax.Array, g: jax.Array,
                block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """Dot products over channels of each sample's output gradient with its four neighbours.

    Args:
      image: `[R, C]`.
      rows: `[4, L]` int32 rows of `image` (all valid).
      g: `[L, C]` the output gradient.
      block_sizes: tile sizes.
      interpret: run the Pallas interpreter instead of compiling for the GPU.

    Returns:
      `[4, L]` float32.
    """
    cb = block_sizes.channel_block(image.shape[1])
    kernel = functools.partial(_dots_kernel, samples=block_sizes.samples, channels=cb)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows.shape[1], block_sizes.samples),),
        out_shape=jax.ShapeDtypeStruct(rows.shape, jnp.float32),
        interpret=interpret,
        compiler_params=block_sizes.triton(),
    )(rows, image, g)


def _runs(rows: jax.Array, weights: jax.Array, num_rows: int, span: int, pixels: int):
    """Sample points sorted by their first row: the permutation `[L]`, the sorted rows and
    weights `[4, L]`, and each block of `pixels` image rows' run `[2, R / pixels]` (start,
    stop) of the points that can touch it."""
    key, order = lax.sort((rows[0], jnp.arange(rows.shape[1], dtype=jnp.int32)), num_keys=1)
    firsts = jnp.arange(pl.cdiv(num_rows, pixels), dtype=jnp.int32) * pixels
    runs = jnp.stack([jnp.searchsorted(key, firsts - span, side="left"),
                      jnp.searchsorted(key, firsts + pixels, side="left")])
    return order, rows[:, order], weights[:, order], runs.astype(jnp.int32)


@functools.partial(jax.jit,
                   static_argnames=("num_rows", "span", "dtype", "block_sizes", "interpret"))
def scatter(rows: jax.Array, weights: jax.Array, g: jax.Array, num_rows: int, span: int,
            dtype: jnp.dtype | None = None, block_sizes: BlockSizes = BlockSizes(),
            interpret: bool = False) -> jax.Array:
    """The adjoint of `gather` in the image: each sample's output gradient, weighted, added to
    its four rows (see the module docstring for the race-free formulation).

    Args:
      rows: `[4, L]` int32 rows, every one with a non-zero weight in
        `[rows[0, l], rows[0, l] + span]`.
      weights: `[4, L]` float32.
      g: `[L, C]` the output gradient.
      num_rows: R, the rows of the image.
      span: as above; W + 1 for the corners of an image of width W.
      dtype: of the result; g's by default.
      block_sizes: tile sizes.
      interpret: run the Pallas interpreter instead of compiling for the GPU.

    Returns:
      `[R, C]`, summed in float32.
    """
    channels = g.shape[1]
    cb, pixels = block_sizes.channel_block(channels), block_sizes.pixels
    order, rows, weights, runs = _runs(rows, weights, num_rows, span, pixels)
    kernel = functools.partial(_scatter_kernel, pixels=pixels, samples=block_sizes.samples,
                               channels=cb)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_rows, pixels), pl.cdiv(channels, cb)),
        out_shape=jax.ShapeDtypeStruct((num_rows, channels), dtype or g.dtype),
        interpret=interpret,
        compiler_params=block_sizes.triton(),
    )(runs, order, rows, weights, g)


# --- the custom VJP and the reference ------------------------------------------------------------


def unsupported(image: jax.Array, grid: jax.Array) -> str | None:
    """Why the kernels cannot sample `image` `[B, H, W, C]` at `grid` `[B, h, w, 2]`, or None."""
    reason = dtype_unsupported(image=image, grid=grid)
    if reason is None and (image.size == 0 or grid.size == 0):
        return f"empty image {tuple(image.shape)} or grid {tuple(grid.shape)}"
    return reason


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def bilinear_gather(image: jax.Array, rows: jax.Array, weights: jax.Array, span: int,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """`gather`, differentiable (reverse mode) w.r.t. `image` and `weights`.

    Args:
      image: `[R, C]`.
      rows: `[4, L]` int32 rows of `image` (all valid), every one with a non-zero weight in
        `[rows[0, l], rows[0, l] + span]`.
      weights: `[4, L]` float32.
      span: as above; W + 1 for the corners of an image of width W.
      block_sizes: tile sizes.
      interpret: run the Pallas interpreter instead of compiling for the GPU.

    Returns:
      `[L, C]` in image's dtype.
    """
    return gather(image, rows, weights, block_sizes, interpret)


def _bilinear_gather_fwd(image, rows, weights, span, block_sizes, interpret):
    out = gather(image, rows, weights, block_sizes, interpret)
    return out, (image, rows, weights)


def _bilinear_gather_bwd(span, block_sizes, interpret, residuals, g):
    image, rows, weights = residuals
    d_image = scatter(rows, weights, g, image.shape[0], span, image.dtype, block_sizes, interpret)
    d_weights = corner_dots(image, rows, g, block_sizes, interpret).astype(weights.dtype)
    return d_image, None, d_weights


bilinear_gather.defvjp(_bilinear_gather_fwd, _bilinear_gather_bwd)


def bilinear_gather_reference(image: jax.Array, rows: jax.Array, weights: jax.Array
                              ) -> jax.Array:
    """What `bilinear_gather` computes, by an XLA gather (summed in float32)."""
    values = image[rows].astype(jnp.float32)  # [4, L, C]
    return jnp.einsum("kl,klc->lc", weights.astype(jnp.float32), values,
                      precision=lax.Precision.HIGHEST).astype(image.dtype)
