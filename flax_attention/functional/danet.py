"""Pure functions: DANet's position and channel attention (Fu et al., CVPR 2019).

Axis legend: B batch, H height, W width, C channels, L = H * W positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import check_rank, check_same

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "position_attention",
    "position_attention_weights",
    "channel_attention",
    "channel_attention_weights",
]

# Queries per block of `position_attention` when no `chunk_size` is given: maps of up to this many
# positions are built whole, larger ones block by block. On CPU, blocks of 256 to 512 queries ran
# as fast as or faster than the whole map from 32x32 to 97x97 positions (DANet's widths: 64 and
# 512), and keep fwd+bwd memory at 512 * L floats instead of L * L.
DEFAULT_CHUNK_SIZE = 512

_Precision = lax.PrecisionLike


def _flatten(x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, L, C]`."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _check_qk(q: jax.Array, k: jax.Array) -> None:
    check_rank("q", q, 4, "[B, H, W, C]")
    check_rank("k", k, 4, "[B, H, W, C]")
    check_same(("q", "k"), (q.shape, k.shape), "shape", (q.shape, k.shape))


def _check_position_inputs(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size) -> None:
    _check_qk(q, k)
    check_rank("v", v, 4, "[B, H, W, C]")
    check_same(("q", "v"), (q.shape[:3], v.shape[:3]), "batch and spatial dimensions",
               (q.shape, v.shape))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")


def _accumulator(dtype) -> jnp.dtype:
    """The dtype of energies and softmax: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def _weights(q: jax.Array, k: jax.Array, precision: _Precision) -> jax.Array:
    """q `[B, Lq, C]`, k `[B, L, C]` -> softmax over keys `[B, Lq, L]`, float32 (or 64)."""
    energy = jnp.einsum("bqc,bkc->bqk", q, k, precision=precision,
                        preferred_element_type=_accumulator(q.dtype))
    return jax.nn.softmax(energy, axis=-1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, precision: _Precision) -> jax.Array:
    """q `[B, Lq, C]`, k `[B, L, C]`, v `[B, L, Cv]` -> `[B, Lq, Cv]` in v's dtype."""
    att = _weights(q, k, precision).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", att, v, precision=precision,
                     preferred_element_type=_accumulator(v.dtype))
    return out.astype(v.dtype)


def _attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int,
                    precision: _Precision) -> jax.Array:
    """`_attend` over blocks of `chunk_size` queries; each block is rematerialised in the
    backward pass, so neither pass holds more than a `[B, chunk_size, L]` map."""
    b, length, c = q.shape
    blocks = -(-length // chunk_size)
    q = jnp.pad(q, ((0, 0), (0, blocks * chunk_size - length), (0, 0)))
    q = q.reshape(b, blocks, chunk_size, c).swapaxes(0, 1)  # [blocks, B, chunk, C]
    block = jax.checkpoint(lambda qb: _attend(qb, k, v, precision))
    out = lax.map(block, q)  # [blocks, B, chunk, Cv]
    return out.swapaxes(0, 1).reshape(b, blocks * chunk_size, -1)[:, :length]


def position_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       chunk_size: int | None = None,
                       precision: _Precision = None) -> jax.Array:
    """DANet's position attention (PAM): every position attends to all H * W positions.

    `energy[i, j] = q_i . k_j` (no 1/sqrt(C) scale, as in the reference), a softmax over the keys
    j in float32, `out_i = sum_j att[i, j] v_j`. The value width may differ from the query/key
    width (DANet: 64 vs 512), which `jax.nn.dot_product_attention` does not allow.

    Memory: with at most `chunk_size` positions (default `DEFAULT_CHUNK_SIZE`, 512) the whole
    `[B, L, L]` map is built. With more, the queries go in blocks of `chunk_size` through
    `lax.map`, each block recomputed in the backward pass, so at most a `[B, chunk_size, L]` map
    is alive in either pass. Both paths give the same values; pass `chunk_size=L` for one block.

    Args:
      q: queries `[B, H, W, C]`.
      k: keys `[B, H, W, C]`, the shape of `q`.
      v: values `[B, H, W, Cv]`.
      chunk_size: queries per block; None for `DEFAULT_CHUNK_SIZE`.
      precision: of the two einsums.

    Returns:
      `[B, H, W, Cv]` in the dtype of `q`, `k` and `v` promoted together.

    Raises:
      ValueError: wrong ranks, `q` and `k` shapes differ, `v` differs from `q` in batch or
        spatial size, or a non-positive `chunk_size`.
    """
    _check_position_inputs(q, k, v, chunk_size)
    dtype = jnp.result_type(q, k, v)
    qf, kf, vf = (_flatten(a).astype(dtype) for a in (q, k, v))
    length = qf.shape[1]
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk_size >= length:
        out = _attend(qf, kf, vf, precision)
    else:
        out = _attend_chunked(qf, kf, vf, chunk_size, precision)
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
    _check_qk(q, k)
    return _weights(_flatten(q), _flatten(k), precision)


def channel_attention_weights(x: jax.Array, *, precision: _Precision = None) -> jax.Array:
    """The attention map of `channel_attention`: `[B, H, W, C]` -> `[B, C, C]`, float32.

    `energy = X^T X` over the positions (C x C), then, as the reference does (not the paper),
    `rowmax(energy) - energy`, and a softmax over the last axis. A softmax ignores a constant per
    row, so this is softmax(-energy): channels attend most to the channels least like them.
    """
    check_rank("x", x, 4, "[B, H, W, C]")
    xf = _flatten(x)
    energy = jnp.einsum("blc,bld->bcd", xf, xf, precision=precision,
                        preferred_element_type=_accumulator(x.dtype))
    # The row maximum only shifts each row; its gradient through the softmax is zero.
    energy = lax.stop_gradient(energy.max(axis=-1, keepdims=True)) - energy
    return jax.nn.softmax(energy, axis=-1)


def channel_attention(x: jax.Array, *, precision: _Precision = None) -> jax.Array:
    """DANet's channel attention (CAM): `out[..., c] = sum_d att[c, d] x[..., d]`.

    Args:
      x: features `[B, H, W, C]`.
      precision: of the two einsums.

    Returns:
      `[B, H, W, C]` in the dtype of `x`; `att` is `channel_attention_weights(x)` `[B, C, C]`.

    Raises:
      ValueError: if `x` is not of rank 4.
    """
    att = channel_attention_weights(x, precision=precision).astype(x.dtype)
    out = jnp.einsum("bcd,bld->blc", att, _flatten(x), precision=precision,
                     preferred_element_type=_accumulator(x.dtype))
    return out.astype(x.dtype).reshape(x.shape)
