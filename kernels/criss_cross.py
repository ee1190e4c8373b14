"""Criss-cross attention (CCNet) as Pallas kernels, forward and backward, behind `jax.custom_vjp`.

Shapes use the legend B batch, H height, W width, C channels, L length (of a line: a row, W
positions, or a column, H positions). `criss_cross_reference` is the plain XLA math the kernels
must equal (values, and gradients by autodiff); `functional.criss_cross_attention` dispatches
between its own XLA path and `criss_cross_attention` here.

Layout: one program holds one whole line (padded to a power of two, `Lp`), so the softmax of
every position over that line is local to the program. A position's softmax runs over its row
AND its column, so each direction is one pass, and the passes are combined like split-K flash
decoding, with log-sum-exps:

- forward, row pass (grid `(B, H, C / block_c)`): row energies, `lse_r`, and the row output
  normalised over the row alone (float32);
- forward, column pass (grid `(B, W, C / block_c)`): column energies without the position
  itself, then the two partial softmaxes are merged into the output and the full `lse`.
- backward, row pass (grid `(B, H)`): weights recomputed from `lse`; a loop over value channel
  blocks builds the weight cotangents `d_out v^T`, `delta = sum(d_out * out)` and the row part
  of `d_v`; then `d_q`, `d_k` of the row (float32 partials);
- backward, column pass (grid `(B, W)`): the same on columns (self excluded), adding the row
  partials and writing the final cotangents.

Weights and aggregation are fused (chosen by counting bytes; not yet timed on a GPU): a
separate weights kernel would write and re-read the `[B, H, W, H+W-1]` float32 weights (half
the size of v for 512 value channels at 128x128) and keep them for the backward pass; fused,
the forward reads q, k (small) and v twice and writes the float32 row partial once, and the
only residual besides the inputs and output is the `[B, H, W]` log-sum-exp.
Lines are read straight from `[B, H, W, C]` (a column block is strided), so no transposes.
Ragged edges (lines shorter than `Lp`, channels not a multiple of the block) are masked loads
and stores; the Pallas interpreter pads blocks with NaN, so a missing mask shows in the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flax_attention.kernels._common import MASK_VALUE, MIN_BLOCK, dtype_unsupported

__all__ = ["BlockSizes", "criss_cross_attention", "criss_cross_reference", "unsupported"]

Precision = jax.lax.PrecisionLike


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the kernels.

    Attributes:
      block_c: value channels per program (forward) or per loop step (backward).
      max_line: the longest line (H or W, padded to a power of two) a program holds: it keeps
        `[Lp, Lp]` float32 weights in registers. Longer lines are unsupported.
      max_qk_channels: the most query/key channels (padded to a power of two).
      num_warps: Triton warps per program.
      num_stages: Triton software pipelining stages.
    """

    block_c: int = 64
    max_line: int = 128
    max_qk_channels: int = 256
    num_warps: int = 8
    num_stages: int = 2


def _padded(n: int) -> int:
    return max(MIN_BLOCK, pl.next_power_of_2(n))


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array,
                block_sizes: BlockSizes = BlockSizes()) -> str | None:
    """Why the kernels cannot take q, k `[B, H, W, C]` and v `[B, H, W, C']`; None if they can."""
    reason = dtype_unsupported(q=q, k=k, v=v)
    if reason is not None:
        return reason
    _, height, width, qk_channels = q.shape
    if _padded(max(height, width)) > block_sizes.max_line:
        return f"H and W ({height}, {width}) must pad to at most max_line={block_sizes.max_line}"
    if _padded(qk_channels) > block_sizes.max_qk_channels:
        return (f"q/k channels ({qk_channels}) must pad to at most "
                f"max_qk_channels={block_sizes.max_qk_channels}")
    return None


# --- kernel bodies: one line of Lp positions ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dims:
    """Static sizes of one pass: positions per line, q/k and value channels, channel block."""

    length: int
    qk_channels: int
    channels: int
    block_c: int


def _valid(length: int, channels: int, start, size: int, lp: int) -> jax.Array:
    rows = jnp.arange(lp) < length
    return rows[:, None] & ((start + jnp.arange(size)) < channels)[None, :]


def _load(ref, length: int, channels: int, start=0, size: int | None = None) -> jax.Array:
    """`[Lp, size]` from channel `start` of a `[Lp, *]` ref; zero outside the array."""
    size = ref.shape[-1] if size is None else size
    mask = _valid(length, channels, start, size, ref.shape[0])
    return plgpu.load(ref.at[:, pl.ds(start, size)], mask=mask, other=0)


def _store(ref, value: jax.Array, length: int, channels: int, start=0) -> None:
    """Writes `[Lp, size]` at channel `start` of a `[Lp, *]` ref, inside the array only."""
    mask = _valid(length, channels, start, value.shape[-1], ref.shape[0])
    plgpu.store(ref.at[:, pl.ds(start, value.shape[-1])], value.astype(ref.dtype), mask=mask)


def _load_line(ref, length: int) -> jax.Array:
    """`[Lp]` per-position statistics; zero past the line's end."""
    return plgpu.load(ref, mask=jnp.arange(ref.shape[0]) < length, other=0)


def _store_line(ref, value: jax.Array, length: int) -> None:
    plgpu.store(ref, value.astype(ref.dtype), mask=jnp.arange(ref.shape[0]) < length)


def _energies(q_ref, k_ref, dims: _Dims, exclude_self: bool, precision: Precision):
    """Energies `[Lp, Lp]` (float32, invalid keys masked), the key mask, and the q, k blocks."""
    dtype = jnp.promote_types(q_ref.dtype, k_ref.dtype)
    q = _load(q_ref, dims.length, dims.qk_channels).astype(dtype)
    k = _load(k_ref, dims.length, dims.qk_channels).astype(dtype)
    energies = plgpu.dot(q, k, trans_b=True, precision=precision)
    pos = jnp.arange(q.shape[0])
    valid = pos[None, :] < dims.length
    if exclude_self:
        valid = valid & (pos[:, None] != pos[None, :])
    return jnp.where(valid, energies, MASK_VALUE), valid, q, k


def _row_forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, dims: _Dims, precision):
    """Row pass: the output normalised over the row alone, and the row's log-sum-exp."""
    energies, valid, _, _ = _energies(q_ref, k_ref, dims, False, precision)
    top = energies.max(-1)
    p = jnp.where(valid, jnp.exp(energies - top[:, None]), 0.0)
    total = p.sum(-1)
    start = pl.program_id(2) * dims.block_c
    v = _load(v_ref, dims.length, dims.channels, start, dims.block_c)
    out = plgpu.dot(p.astype(v.dtype), v, precision=precision) / total[:, None]
    _store(o_ref, out, dims.length, dims.channels, start)
    _store_line(lse_ref, top + jnp.log(total), dims.length)


def _column_forward_kernel(q_ref, k_ref, v_ref, o_row_ref, lse_row_ref, o_ref, lse_ref, *,
                           dims: _Dims, precision):
    """Column pass (self excluded), merged with the row pass: the output and the full lse."""
    energies, valid, _, _ = _energies(q_ref, k_ref, dims, True, precision)
    lse_row = _load_line(lse_row_ref, dims.length)
    top = jnp.maximum(energies.max(-1), lse_row)
    p = jnp.where(valid, jnp.exp(energies - top[:, None]), 0.0)
    row_weight = jnp.exp(lse_row - top)
    total = row_weight + p.sum(-1)
    start = pl.program_id(2) * dims.block_c
    v = _load(v_ref, dims.length, dims.channels, start, dims.block_c)
    o_row = _load(o_row_ref, dims.length, dims.channels, start, dims.block_c)
    out = o_row * row_weight[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    _store(o_ref, out / total[:, None], dims.length, dims.channels, start)
    _store_line(lse_ref, top + jnp.log(total), dims.length)


def _backward_kernel(*refs, dims: _Dims, first: bool, precision):
    """One backward pass. The first (rows) reads `out`, writes float32 partial cotangents and
    `delta = sum(d_out * out)`; the second (columns, self excluded) reads `delta` and the
    partials and writes the final cotangents."""
    if first:
        q_ref, k_ref, v_ref, do_ref, lse_ref, out_ref, dq_ref, dk_ref, dv_ref, delta_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_part, dk_part, dv_part,
         dq_ref, dk_ref, dv_ref) = refs
    length, channels, block = dims.length, dims.channels, dims.block_c
    energies, valid, q, k = _energies(q_ref, k_ref, dims, not first, precision)
    lse = _load_line(lse_ref, length)
    weights = jnp.where(valid, jnp.exp(energies - lse[:, None]), 0.0)

    def step(i, carry):
        d_weights, delta = carry
        start = i * block
        d_o = _load(do_ref, length, channels, start, block)
        v = _load(v_ref, length, channels, start, block)
        d_weights = d_weights + plgpu.dot(d_o, v, trans_b=True, precision=precision)
        d_v = plgpu.dot(weights.astype(d_o.dtype), d_o, trans_a=True, precision=precision)
        if first:
            out = _load(out_ref, length, channels, start, block)
            delta = delta + jnp.sum(d_o.astype(jnp.float32) * out.astype(jnp.float32), -1)
        else:
            d_v = d_v + _load(dv_part, length, channels, start, block)
        _store(dv_ref, d_v, length, channels, start)
        return d_weights, delta

    lp = weights.shape[0]
    init = (jnp.zeros((lp, lp), jnp.float32), jnp.zeros((lp,), jnp.float32))
    d_weights, delta = jax.lax.fori_loop(0, pl.cdiv(channels, block), step, init)
    if first:
        _store_line(delta_ref, delta, length)
    else:
        delta = _load_line(delta_ref, length)
    d_energies = weights * (d_weights - delta[:, None])
    d_q = plgpu.dot(d_energies.astype(k.dtype), k, precision=precision)
    d_k = plgpu.dot(d_energies.astype(q.dtype), q, trans_a=True, precision=precision)
    if not first:
        d_q = d_q + _load(dq_part, length, dims.qk_channels)
        d_k = d_k + _load(dk_part, length, dims.qk_channels)
    _store(dq_ref, d_q, length, dims.qk_channels)
    _store(dk_ref, d_k, length, dims.qk_channels)


# --- pallas_call wrappers ----------------------------------------------------------------------


def _line_spec(row: bool, lp: int, x: jax.ShapeDtypeStruct) -> pl.BlockSpec:
    """One whole line of `x` `[B, H, W, C]` (channels padded) or `[B, H, W]`: row `i` or
    column `i` of batch `b`, for the grid index `(b, i, ...)`."""
    if row:
        shape, index = (None, None, lp), lambda b, i, *_: (b, i, 0)
    else:
        shape, index = (None, lp, None), lambda b, i, *_: (b, 0, i)
    if x.ndim == 3:
        return pl.BlockSpec(shape, index)
    return pl.BlockSpec((*shape, _padded(x.shape[-1])), lambda *g: (*index(*g), 0))


def _pass(kernel, row: bool, channel_grid: bool, inputs, out_shapes, precision,
          block_sizes: BlockSizes, interpret: bool, name: str):
    """Runs `kernel` on every row (`row`) or column: grid `(B, lines[, C / block_c])`."""
    q, v = inputs[0], inputs[2]
    batch, height, width, qk_channels = q.shape
    length, lines = (width, height) if row else (height, width)
    block = min(block_sizes.block_c, _padded(v.shape[-1]))
    dims = _Dims(length, qk_channels, v.shape[-1], block)
    grid = (batch, lines, pl.cdiv(v.shape[-1], block)) if channel_grid else (batch, lines)
    lp = _padded(length)
    return pl.pallas_call(
        functools.partial(kernel, dims=dims, precision=precision),
        grid=grid,
        in_specs=[_line_spec(row, lp, x) for x in inputs],
        out_specs=[_line_spec(row, lp, s) for s in out_shapes],
        out_shape=out_shapes,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


def _like(x: jax.Array, dtype=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)


def _forward(q, k, v, precision, block_sizes, interpret):
    """`(out [B, H, W, C'], lse [B, H, W] float32)`."""
    lse_shape = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    run = functools.partial(_pass, precision=precision, block_sizes=block_sizes,
                            interpret=interpret)
    o_row, lse_row = run(_row_forward_kernel, True, True, (q, k, v),
                         [_like(v, jnp.float32), lse_shape], name="criss_cross_fwd_rows")
    out, lse = run(_column_forward_kernel, False, True, (q, k, v, o_row, lse_row),
                   [_like(v), lse_shape], name="criss_cross_fwd_columns")
    return out, lse


def _backward(q, k, v, out, lse, d_out, precision, block_sizes, interpret):
    """The cotangents of q, k and v, from the saved output and log-sum-exp."""
    run = functools.partial(_pass, channel_grid=False, precision=precision,
                            block_sizes=block_sizes, interpret=interpret)
    f32 = jnp.float32
    *parts, delta = run(functools.partial(_backward_kernel, first=True), True,
                        inputs=(q, k, v, d_out, lse, out),
                        out_shapes=[_like(q, f32), _like(k, f32), _like(v, f32), _like(lse)],
                        name="criss_cross_bwd_rows")
    return tuple(run(functools.partial(_backward_kernel, first=False), False,
                     inputs=(q, k, v, d_out, lse, delta, *parts),
                     out_shapes=[_like(q), _like(k), _like(v)], name="criss_cross_bwd_columns"))


# --- the custom VJP, the public entry point and the reference ----------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, precision, block_sizes, interpret):
    return _forward(q, k, v, precision, block_sizes, interpret)[0]


def _attention_fwd(q, k, v, precision, block_sizes, interpret):
    out, lse = _forward(q, k, v, precision, block_sizes, interpret)
    return out, (q, k, v, out, lse)


def _attention_bwd(precision, block_sizes, interpret, residuals, d_out):
    return _backward(*residuals, d_out, precision, block_sizes, interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("precision", "block_sizes", "interpret"))
def criss_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, precision: Precision = None,
                          block_sizes: BlockSizes = BlockSizes(),
                          interpret: bool = False) -> jax.Array:
    """Criss-cross attention by the Pallas kernels (shapes checked by the caller); reverse-mode
    differentiable (the backward pass is two more kernels).

    Args:
      q: queries `[B, H, W, C]`.
      k: keys `[B, H, W, C]`.
      v: values `[B, H, W, C']`.
      precision: passed to every dot of the kernels.
      block_sizes: the tiling.
      interpret: run the Pallas interpreter (any platform) instead of compiling for the GPU.

    Returns:
      `[B, H, W, C']` in v's dtype.

    Raises:
      ValueError: inputs the kernels do not support (see `unsupported`).
    """
    reason = unsupported(q, k, v, block_sizes)
    if reason is not None:
        raise ValueError(f"criss-cross Pallas kernel: {reason}")
    return _attention(q, k, v, precision, block_sizes, interpret)


def criss_cross_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                          precision: Precision = None) -> jax.Array:
    """What `criss_cross_attention` computes, in plain XLA: the energies of each position's row
    `[B, H, W, W]` and column `[B, H, W, H]` (itself masked), one float32 softmax over both."""
    energy = functools.partial(jnp.einsum, precision=precision,
                               preferred_element_type=jnp.float32)
    row = energy("bhwc,bhuc->bhwu", q, k)
    column = energy("bhwc,bgwc->bhwg", q, k)
    height = q.shape[1]
    column = jnp.where(jnp.eye(height, dtype=bool)[:, None, :], MASK_VALUE, column)
    weights = jax.nn.softmax(jnp.concatenate([row, column], axis=-1), axis=-1).astype(v.dtype)
    out = (energy("bhwu,bhuc->bhwc", weights[..., :-height], v)
           + energy("bhwg,bgwc->bhwc", weights[..., -height:], v))
    return out.astype(v.dtype)
