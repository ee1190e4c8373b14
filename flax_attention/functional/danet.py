"""Pure functions: DANet's position and channel attention (Fu et al., CVPR 2019).

Axis legend: B batch, H height, W width, C channels, L = H * W positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_image, check_nonempty, check_rank, check_same
from flax_attention.functional.blockwise import (
    DEFAULT_CHUNK_SIZE,
    accumulated_einsum,
    attention_weights,
    blockwise_attention,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "position_attention",
    "position_attention_weights",
    "channel_attention",
    "channel_attention_weights",
    "gram_matrix",
]

_Precision = lax.PrecisionLike


def _flatten(x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, L, C]`."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _check_qk(q: jax.Array, k: jax.Array) -> None:
    check_rank("q", q, 4, "[B, H, W, C]")
    check_rank("k", k, 4, "[B, H, W, C]")
    check_same(("q", "k"), (q.shape, k.shape), "shape", (q.shape, k.shape))
    check_nonempty("q", q, "[B, H, W, C]")


def _check_position_inputs(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    _check_qk(q, k)
    check_rank("v", v, 4, "[B, H, W, C]")
    check_same(("q", "v"), (q.shape[:3], v.shape[:3]), "batch and spatial dimensions",
               (q.shape, v.shape))
    check_nonempty("v", v, "[B, H, W, Cv]")


def position_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       chunk_size: int | None = None, implementation: str | None = None,
                       precision: _Precision = None) -> jax.Array:
    """DANet's position attention (PAM): every position attends to all H * W positions.

    `energy[i, j] = q_i . k_j` (no 1/sqrt(C) scale, as in the reference), a softmax over the keys
    j in float32, `out_i = sum_j att[i, j] v_j`. The value width may differ from the query/key
    width (DANet: 64 vs 512). Computed by `blockwise.blockwise_attention` on the flattened
    positions: with at most `chunk_size` positions (default `DEFAULT_CHUNK_SIZE`, 512) the whole
    `[B, L, L]` map is built; with more, blocks of `chunk_size` queries (memory O(L), reverse-mode
    differentiation only); cuDNN or the Pallas flash kernel when asked for.

    Args:
      q: queries `[B, H, W, C]`.
      k: keys `[B, H, W, C]`, the shape of `q`.
      v: values `[B, H, W, Cv]`.
      chunk_size: queries per block; None for `DEFAULT_CHUNK_SIZE`.
      implementation: "xla", "pallas", "cudnn" or None, as in `blockwise_attention`.
      precision: of the two matrix products.

    Returns:
      `[B, H, W, Cv]` in the dtype of `q`, `k` and `v` promoted together (integer and boolean
      inputs are promoted to float32 first).

    Raises:
      ValueError: wrong ranks, `q` and `k` shapes differ, `v` differs from `q` in batch or
        spatial size, a zero-size dimension, a non-positive `chunk_size` or a bad
        `implementation`.
    """
    q, k, v = map(as_float, (q, k, v))
    _check_position_inputs(q, k, v)
    out = blockwise_attention(_flatten(q), _flatten(k), _flatten(v), chunk_size=chunk_size,
                              implementation=implementation, precision=precision)
    return out.reshape(v.shape)


def position_attention_weights(q: jax.Array, k: jax.Array, *,
                               precision: _Precision = None) -> jax.Array:
    """The attention map of `position_attention`, the full `[B, L, L]` (L = H * W), float32.

    Args:
      q: queries `[B, H, W, C]`.
      k: keys `[B, H, W, C]`, the shape of `q`.
      precision: of the einsum.

    Returns:
      `[B, L, L]`: row i (query position i, row-major over H, W) sums to 1 over the keys.
    """
    q, k = map(as_float, (q, k))
    _check_qk(q, k)
    return attention_weights(_flatten(q), _flatten(k), precision=precision)


# Channels per block of `gram_matrix`. At DANet's C = 512 on a 2-core CPU, blocks of 128 took
# 0.75-0.8x the time of the whole product (4096 positions: 9.7 vs 12.7 ms; 9409: 21.4 vs
# 29.5 ms); blocks of 64 were slower than the whole product (13.9 and 35.8 ms).
GRAM_BLOCK = 128


def gram_matrix(xf: jax.Array, precision: _Precision = None) -> jax.Array:
    """`X^T X` of xf `[B, L, C]`: `[B, C, C]`, float32 (float64 for float64 inputs).

    The matrix is symmetric, so with n >= 2 blocks of `GRAM_BLOCK` channels only the n (n + 1) / 2
    blocks on and above the diagonal are products (10 of 16 at C = 512); each block below is the
    transpose of its mirror, so the result is exactly symmetric.
    """
    starts = range(0, xf.shape[-1], GRAM_BLOCK)
    if len(starts) < 2:
        return accumulated_einsum("blc,bld->bcd", xf, xf, precision)
    parts = [xf[..., i:i + GRAM_BLOCK] for i in starts]
    upper = {(i, j): accumulated_einsum("blc,bld->bcd", parts[i], parts[j], precision)
             for i in range(len(parts)) for j in range(i, len(parts))}
    rows = [[upper[i, j] if i <= j else jnp.swapaxes(upper[j, i], 1, 2)
             for j in range(len(parts))] for i in range(len(parts))]
    return jnp.concatenate([jnp.concatenate(row, axis=2) for row in rows], axis=1)


def channel_attention_weights(x: jax.Array, *, precision: _Precision = None) -> jax.Array:
    """The attention map of `channel_attention`: `[B, H, W, C]` -> `[B, C, C]`, float32.

    `energy = X^T X` over the positions (C x C, `gram_matrix`), then, as the reference does (not
    the paper), `rowmax(energy) - energy`, and a softmax over the last axis. A softmax ignores a
    constant per row, so this is softmax(-energy): channels attend most to the channels least
    like them.
    """
    x = as_float(x)
    check_image("x", x)
    energy = gram_matrix(_flatten(x), precision)
    # The row maximum only shifts each row; its gradient through the softmax is zero.
    energy = lax.stop_gradient(energy.max(axis=-1, keepdims=True)) - energy
    return jax.nn.softmax(energy, axis=-1)


def channel_attention(x: jax.Array, *, precision: _Precision = None) -> jax.Array:
    """DANet's channel attention (CAM): `out[..., c] = sum_d att[c, d] x[..., d]`.

    A `jax.custom_vjp` with a hand-written backward pass (see `_channel_attention`):
    differentiable in reverse mode only (`jax.grad`, not `jax.jvp`).

    Args:
      x: features `[B, H, W, C]`.
      precision: of the two einsums.

    Returns:
      `[B, H, W, C]` in the dtype of `x`; `att` is `channel_attention_weights(x)` `[B, C, C]`.

    Raises:
      ValueError: if `x` is not of rank 4 or has a zero-size dimension.
    """
    x = as_float(x)
    check_image("x", x)
    return _channel_attention(x, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _channel_attention(x: jax.Array, precision: _Precision) -> jax.Array:
    """`channel_attention` on a checked `x` `[B, H, W, C]`, with a hand-written backward pass.

    With `out = X A^T` and `A = softmax(rowmax(E) - E)`, `E = X^T X` (X `[L, C]`), autodiff takes
    three `[L, C] x [C, C]` products for dX and adds their transposed results; here
    dA = dOut^T X, dE = -A * (dA - rowsum(dA * A)), and dX = dOut A + X (dE + dE^T): two products
    into one sum (the gradient of the row maximum is zero: a softmax ignores it).
    """
    return _channel_attention_fwd(x, precision)[0]


def _channel_attention_fwd(x: jax.Array, precision: _Precision):
    att = channel_attention_weights(x, precision=precision)
    out = accumulated_einsum("bcd,bld->blc", att.astype(x.dtype), _flatten(x), precision)
    return out.astype(x.dtype).reshape(x.shape), (x, att)


# Positions per block of the backward pass's dX (`_by_positions`). At C = 512 on a 2-core CPU,
# forward+backward took 0.86x the time of whole products (64x64: 52.8 -> 45.5 ms; 97x97:
# 131.8 -> 113.0 ms); blocks of 1024 and 2048 positions were slightly slower than 512.
_POSITION_BLOCK = 512


def _by_positions(fn, a: jax.Array, b: jax.Array) -> jax.Array:
    """`fn(a, b)` for an `fn` that maps each position (axis 1) of a and b `[B, L, C]` alone to
    `[B, L, C']`, by blocks of `_POSITION_BLOCK` positions written in place: the sum of two
    products is never two whole arrays. The last block ends at L, overlapping the block before
    it, whose rows it writes again with the same values."""
    length = a.shape[1]
    if length <= _POSITION_BLOCK:
        return fn(a, b)

    def block(i, out):
        start = jnp.minimum(i * _POSITION_BLOCK, length - _POSITION_BLOCK)
        rows = (lax.dynamic_slice_in_dim(y, start, _POSITION_BLOCK, axis=1) for y in (a, b))
        return lax.dynamic_update_slice_in_dim(out, fn(*rows), start, axis=1)

    shape = jax.eval_shape(fn, a[:, :1], b[:, :1])
    out = jnp.empty((a.shape[0], length, shape.shape[-1]), shape.dtype)
    return lax.fori_loop(0, -(-length // _POSITION_BLOCK), block, out)


def _channel_attention_bwd(precision: _Precision, residuals, d_out: jax.Array):
    x, att = residuals
    xf, d_outf = _flatten(x), _flatten(d_out)
    d_att = accumulated_einsum("blc,bld->bcd", d_outf, xf, precision)
    d_energy = att * (d_att - jnp.sum(d_att * att, axis=-1, keepdims=True))  # minus dE
    symmetric = -(d_energy + jnp.swapaxes(d_energy, 1, 2)).astype(x.dtype)
    weights = att.astype(x.dtype)

    def d_x(d_out_rows: jax.Array, x_rows: jax.Array) -> jax.Array:
        return (accumulated_einsum("blc,bcd->bld", d_out_rows, weights, precision)
                + accumulated_einsum("bld,bdc->blc", x_rows, symmetric, precision)
                ).astype(x.dtype)

    return (_by_positions(d_x, d_outf, xf).reshape(x.shape),)


_channel_attention.defvjp(_channel_attention_fwd, _channel_attention_bwd)
