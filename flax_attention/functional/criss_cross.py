"""Criss-cross attention (Huang et al., "CCNet: Criss-Cross Attention for Semantic
Segmentation", ICCV 2019): every position attends to the H + W - 1 positions of its row and
its column, with ONE softmax over both, the position itself counted once.

Shapes use the legend B batch, H height, W width, C channels. Everything is written as batched
matmuls over rows; the column branch is the row branch on inputs with H and W swapped
(`[B, W, H, C]`), so no HW x HW matrix is ever built and memory grows as HW(H + W).
Internally the column weights are kept transposed, `[B, W, H, H]`, with a zero on the position
itself, which needs no gather; CCNet's CUDA layout (`[B, H, W, H+W-1]`: the W row entries left
to right, then the H - 1 column entries top to bottom without the position itself) is produced
only by `criss_cross_weights` and read by `criss_cross_aggregate`.

`criss_cross_attention(..., implementation=)` picks this XLA path ("xla"; and None: the kernels
have not been timed on a GPU yet) or the fused Pallas kernels of
`flax_attention.kernels.criss_cross` ("pallas"). `criss_cross_weights` and
`criss_cross_aggregate` stay XLA only: their `[B, H, W, H+W-1]` weights are a full-size tensor
in memory either way, and the kernels' point is never to write it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flax_attention._checks import as_float, check_nonempty, check_rank, check_same
from flax_attention.kernels import criss_cross as kernel
from flax_attention.kernels._common import MASK_VALUE, on_gpu, pick_implementation

__all__ = ["IMPLEMENTATIONS", "criss_cross_aggregate", "criss_cross_attention",
           "criss_cross_weights"]

IMPLEMENTATIONS = ("xla", "pallas", None)  # of `criss_cross_attention`
_LAYOUT = "[B, H, W, C]"
Precision = jax.lax.PrecisionLike

# Row-branch einsums, batched over (b, h); u indexes the W positions of the row.
_ENERGY = "bhwc,bhuc->bhwu"  # q k^T: energies, or d_out v^T: weight cotangents
_MIX = "bhwu,bhuc->bhwc"  # a v: outputs, or d_energy k: query cotangents
_MIX_T = "bhwu,bhwc->bhuc"  # a^T d_out: value cotangents, or d_energy^T q: key cotangents


def _check_qk(q: jax.Array, k: jax.Array) -> None:
    check_rank("q", q, 4, _LAYOUT)
    check_rank("k", k, 4, _LAYOUT)
    check_same(("q", "k"), (q.shape, k.shape), "shape", (q.shape, k.shape))
    check_nonempty("q", q, _LAYOUT)


def _check_spatial(names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
    check_same(names, (a.shape[:3], b.shape[:3]), "batch and spatial dimensions [B, H, W]",
               (a.shape, b.shape))


def _swap(x: jax.Array) -> jax.Array:
    """`[B, H, W, ...]` <-> `[B, W, H, ...]`: columns become rows."""
    return x.swapaxes(1, 2)


def _at_least_f32(*xs: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _einsum(spec: str, a: jax.Array, b: jax.Array, precision: Precision, dtype=None):
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=dtype)


def _both(spec: str, row: jax.Array, col: jax.Array, x: jax.Array, precision: Precision):
    """`spec` applied to the row operand and `x`, plus to the (transposed) column operand and
    `x` transposed, the column result transposed back: `[B, H, W, ...]`."""
    return _einsum(spec, row, x, precision) + _swap(_einsum(spec, col, _swap(x), precision))


def _weights(q: jax.Array, k: jax.Array, precision: Precision) -> tuple[jax.Array, jax.Array]:
    """Softmax weights (float32 at least): rows `[B, H, W, W]`, columns transposed
    `[B, W, H, H]` (zero on the position itself), normalised together."""
    dtype = _at_least_f32(q, k)
    e_row = _einsum(_ENERGY, q, k, precision, dtype)
    e_col = _einsum(_ENERGY, _swap(q), _swap(k), precision, dtype)
    e_col = jnp.where(jnp.eye(q.shape[1], dtype=bool), MASK_VALUE, e_col)
    top = jnp.maximum(e_row.max(-1), _swap(e_col.max(-1)))[..., None]
    p_row, p_col = jnp.exp(e_row - top), jnp.exp(e_col - _swap(top))
    total = (p_row.sum(-1) + _swap(p_col.sum(-1)))[..., None]
    return p_row / total, p_col / _swap(total)


# Elements of v per block of channels in `_by_channels` (512 KiB of float32), and at most this
# many blocks (each adds its products to the program). Measured on a 2-core CPU, forward+backward
# at C = 512 (the forward alone is left whole: blocks made it 1.3-1.6x slower): 32x32 4.5 ->
# 3.1 ms, 64x64 35-38 -> 18-23 ms (the program's temporaries 39 -> 29 MiB, below glibc's
# 32 MiB mmap threshold, so they no longer fault in fresh pages every call), 97x97 119 -> 89 ms,
# B = 2 at 128x128 389 -> 345 ms.
_CHANNEL_BLOCK_ELEMENTS = 2**17
_MAX_CHANNEL_BLOCKS = 32


def _by_channels(fn, x: jax.Array) -> jax.Array:
    """`fn(x)` for an `fn` that acts on each channel of `x` `[..., C]` alone, applied to blocks
    of channels in turn and concatenated: each block's products and transposes are a fraction
    of the size, so the program's temporaries stay small."""
    blocks = min(_MAX_CHANNEL_BLOCKS, -(-x.size // _CHANNEL_BLOCK_ELEMENTS), x.shape[-1])
    if blocks == 1:
        return fn(x)
    width = -(-x.shape[-1] // blocks)
    return jnp.concatenate([fn(x[..., i:i + width]) for i in range(0, x.shape[-1], width)], -1)


def _mix(a_row: jax.Array, a_col: jax.Array, v: jax.Array, precision: Precision) -> jax.Array:
    """Weights from `_weights` applied to v `[B, H, W, C]`, in v's dtype."""
    return _both(_MIX, a_row.astype(v.dtype), a_col.astype(v.dtype), v, precision)


def _below(height: int) -> jax.Array:
    """`[H, H-1]`: True where column entry j (self excluded) is above row h, i.e. j < h."""
    return jnp.arange(height - 1)[None, :] < jnp.arange(height)[:, None]


def _drop_self(a_col: jax.Array) -> jax.Array:
    """`[B, W, H, H]` -> `[B, W, H, H-1]`: column entries without the position's own row."""
    return jnp.where(_below(a_col.shape[-1]), a_col[..., :-1], a_col[..., 1:])


def _insert_self(c: jax.Array) -> jax.Array:
    """`[B, W, H, H-1]` -> `[B, W, H, H]` with a zero at the position's own row."""
    height = c.shape[-2]
    g, h = jnp.arange(height)[None, :], jnp.arange(height)[:, None]
    pad = [(0, 0)] * (c.ndim - 1)
    upper = jnp.pad(c, [*pad, (0, 1)])  # entry g is c[g]: the rows above h
    lower = jnp.pad(c, [*pad, (1, 0)])  # entry g is c[g - 1]: the rows below h
    return jnp.where(g < h, upper, jnp.where(g > h, lower, 0))


def criss_cross_weights(q: jax.Array, k: jax.Array, precision: Precision = None) -> jax.Array:
    """The criss-cross attention weights, in CCNet's CUDA order.

    Args:
      q: queries `[B, H, W, C]`.
      k: keys `[B, H, W, C]`.
      precision: passed to the einsums.

    Returns:
      `[B, H, W, H+W-1]` weights (float32, or float64 for float64 inputs) summing to 1 over
      the last axis: the W entries of the position's row (left to right, itself included),
      then the H - 1 entries of its column (top to bottom, itself excluded).
    """
    q, k = map(as_float, (q, k))
    _check_qk(q, k)
    a_row, a_col = _weights(q, k, precision)
    return jnp.concatenate([a_row, _swap(_drop_self(a_col))], axis=-1)


def criss_cross_aggregate(weights: jax.Array, v: jax.Array, precision: Precision = None):
    """Applies criss-cross weights to values (CCNet's `ca_map`).

    Args:
      weights: `[B, H, W, H+W-1]` in the order of `criss_cross_weights`.
      v: values `[B, H, W, C]`.
      precision: passed to the einsums.

    Returns:
      `[B, H, W, C]` in v's dtype: for each position, the weighted sum of the values of its row
      and column.
    """
    weights, v = map(as_float, (weights, v))
    check_rank("weights", weights, 4, "[B, H, W, H+W-1]")
    check_rank("v", v, 4, _LAYOUT)
    check_nonempty("v", v, _LAYOUT)
    _check_spatial(("weights", "v"), weights, v)
    _, height, width, _ = v.shape
    check_same(("weights", "v"), (weights.shape[-1], height + width - 1),
               "entries per position (weights' last axis must be H+W-1)", (weights.shape, v.shape))
    a_col = _insert_self(_swap(weights[..., width:]))
    return _mix(weights[..., :width], a_col, v, precision)


def criss_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, precision: Precision = None,
                          implementation: str | None = None) -> jax.Array:
    """Criss-cross attention: `criss_cross_aggregate(criss_cross_weights(q, k), v)`, fused.

    "xla": a `jax.custom_vjp` whose backward pass is written as batched matmuls over rows and
    columns, from the weights saved by the forward pass. "pallas": the kernels of
    `flax_attention.kernels.criss_cross`, which keep only a `[B, H, W]` log-sum-exp.

    Args:
      q: queries `[B, H, W, C]`.
      k: keys `[B, H, W, C]`.
      v: values `[B, H, W, C']`, any channel count.
      precision: passed to the einsums (or the kernels' dots).
      implementation: "xla", "pallas" (interpreted off the GPU), or None (XLA).

    Returns:
      `[B, H, W, C']` in v's dtype (float32 for integer or boolean inputs, which are promoted).

    Raises:
      ValueError: bad shapes, an unknown `implementation`, or "pallas" for inputs the kernels
        do not support (e.g. float64, lines longer than `kernel.BlockSizes.max_line`).
    """
    q, k, v = map(as_float, (q, k, v))
    _check_qk(q, k)
    check_rank("v", v, 4, _LAYOUT)
    check_nonempty("v", v, _LAYOUT)
    _check_spatial(("q", "v"), q, v)
    reasons = {"pallas": kernel.unsupported(q, k, v)}
    if pick_implementation("criss_cross_attention", implementation, IMPLEMENTATIONS,
                           reasons) == "pallas":
        return kernel.criss_cross_attention(q, k, v, precision, interpret=not on_gpu())
    return _attention(q, k, v, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, precision):
    return _mix(*_weights(q, k, precision), v, precision)


def _attention_fwd(q, k, v, precision):
    """The forward pass under differentiation: values by blocks of channels, as the backward
    pass's value cotangents, so that the whole program's temporaries stay small."""
    a_row, a_col = _weights(q, k, precision)
    out = _by_channels(lambda v: _mix(a_row, a_col, v, precision), v)
    return out, (q, k, v, a_row, a_col)


def _attention_bwd(precision, residuals, d_out):
    q, k, v, a_row, a_col = residuals
    dtype = a_row.dtype
    d_out, v_up, q_up, k_up = (x.astype(dtype) for x in (d_out, v, q, k))
    d_v = _by_channels(lambda d: _both(_MIX_T, a_row, a_col, d, precision), d_out)
    # The weights' cotangents, then the softmax backward over rows and columns together.
    d_row = _einsum(_ENERGY, d_out, v_up, precision)
    d_col = _einsum(_ENERGY, _swap(d_out), _swap(v_up), precision)
    total = ((a_row * d_row).sum(-1) + _swap((a_col * d_col).sum(-1)))[..., None]
    d_row, d_col = a_row * (d_row - total), a_col * (d_col - _swap(total))
    d_q = _both(_MIX, d_row, d_col, k_up, precision)
    d_k = _both(_MIX_T, d_row, d_col, q_up, precision)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
