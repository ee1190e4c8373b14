"""Pure functions: DANet's position and channel attention (Fu et al., CVPR 2019).

Axis legend: B batch, H height, W width, C channels, L = H * W positions.
"""

from __future__ import annotations

import functools

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
# positions are built whole, larger ones block by block. Measured on CPU at DANet's widths (64 and
# 512): blocks of 256 to 1024 queries beat the whole map from 32x32 to 97x97 positions (forward
# 1.1-1.3x, forward+backward 1.2-1.4x) and keep memory at 512 * L floats instead of L * L.
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


def _dot(spec: str, a: jax.Array, b: jax.Array, precision: _Precision) -> jax.Array:
    """`einsum(spec, a, b)` accumulated in `_accumulator` of b's dtype."""
    return jnp.einsum(spec, a, b, precision=precision,
                      preferred_element_type=_accumulator(b.dtype))


def _weights(q: jax.Array, k: jax.Array, precision: _Precision) -> jax.Array:
    """q `[B, Lq, C]`, k `[B, L, C]` -> softmax over keys `[B, Lq, L]`, float32 (or 64)."""
    return jax.nn.softmax(_dot("bqc,bkc->bqk", q, k, precision), axis=-1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, precision: _Precision) -> jax.Array:
    """q `[B, L, C]`, k `[B, L, C]`, v `[B, L, Cv]` -> `[B, L, Cv]` in v's dtype."""
    att = _weights(q, k, precision).astype(v.dtype)
    return _dot("bqk,bkc->bqc", att, v, precision).astype(v.dtype)


# --- The chunked path: blocks of queries, with a flash-attention style backward pass. ----------


def _blocks(x: jax.Array, chunk_size: int) -> jax.Array:
    """`[B, L, ...]` -> `[blocks, B, chunk_size, ...]`, zero-padded to whole blocks."""
    blocks = -(-x.shape[1] // chunk_size)
    pad = [(0, 0), (0, blocks * chunk_size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad).reshape(x.shape[0], blocks, chunk_size, *x.shape[2:])
    return x.swapaxes(0, 1)


def _unblocks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `_blocks`: `[blocks, B, chunk_size, ...]` -> `[B, length, ...]`."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunked_forward(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int,
                     precision: _Precision) -> tuple[jax.Array, jax.Array]:
    """Returns `_attend(q, k, v)` and the log-sum-exp of every query's energies `[B, L]`."""

    def block(qb: jax.Array) -> tuple[jax.Array, jax.Array]:
        energy = _dot("bqc,bkc->bqk", qb, k, precision)
        top = energy.max(axis=-1, keepdims=True)
        p = jnp.exp(energy - top)
        total = p.sum(axis=-1, keepdims=True)
        out = _dot("bqk,bkc->bqc", p.astype(v.dtype), v, precision) / total
        return out.astype(v.dtype), (top + jnp.log(total))[..., 0]

    out, lse = lax.map(block, _blocks(q, chunk_size))
    return _unblocks(out, q.shape[1]), _unblocks(lse, q.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int,
                    precision: _Precision) -> jax.Array:
    """`_attend` over blocks of `chunk_size` queries (`lax.map`). The backward pass recomputes
    each block's map from the saved log-sum-exp, so neither pass holds more than a
    `[B, chunk_size, L]` map."""
    return _chunked_forward(q, k, v, chunk_size, precision)[0]


def _attend_chunked_fwd(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int,
                        precision: _Precision) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = _chunked_forward(q, k, v, chunk_size, precision)
    return out, (q, k, v, out, lse)


def _attend_chunked_bwd(chunk_size: int, precision: _Precision, residuals: tuple[jax.Array, ...],
                        d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, out, lse = residuals
    acc = _accumulator(v.dtype)
    # sum_j att_ij d(att_ij) = d_out_i . out_i: a [B, L] vector instead of a pass over the map.
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)

    def block(carry, xs):
        dk, dv = carry
        qb, d_outb, lseb, deltab = xs
        att = jnp.exp(_dot("bqc,bkc->bqk", qb, k, precision) - lseb[..., None])
        dv = dv + _dot("bqk,bqc->bkc", att.astype(v.dtype), d_outb, precision)
        d_att = _dot("bqc,bkc->bqk", d_outb, v, precision)
        d_energy = (att * (d_att - deltab[..., None])).astype(q.dtype)
        dk = dk + _dot("bqk,bqc->bkc", d_energy, qb, precision)
        return (dk, dv), _dot("bqk,bkc->bqc", d_energy, k, precision)

    xs = tuple(_blocks(x, chunk_size) for x in (q, d_out, lse, delta))
    init = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
    (dk, dv), dq = lax.scan(block, init, xs)
    return _unblocks(dq, q.shape[1]).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attend_chunked.defvjp(_attend_chunked_fwd, _attend_chunked_bwd)


def position_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       chunk_size: int | None = None,
                       precision: _Precision = None) -> jax.Array:
    """DANet's position attention (PAM): every position attends to all H * W positions.

    `energy[i, j] = q_i . k_j` (no 1/sqrt(C) scale, as in the reference), a softmax over the keys
    j in float32, `out_i = sum_j att[i, j] v_j`. The value width may differ from the query/key
    width (DANet: 64 vs 512), which `jax.nn.dot_product_attention` does not allow.

    Memory: with at most `chunk_size` positions (default `DEFAULT_CHUNK_SIZE`, 512) the whole
    `[B, L, L]` map is built. With more, the queries go in blocks of `chunk_size` through
    `lax.map`, and a `custom_vjp` recomputes each block's map in the backward pass from the saved
    log-sum-exp of its energies (as flash attention does), so at most a `[B, chunk_size, L]` map
    is alive in either pass. Both paths give the same values (pass `chunk_size=L` for one block);
    the chunked one is differentiable in reverse mode only (`jax.grad`, not `jax.jvp`).

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
    energy = _dot("blc,bld->bcd", xf, xf, precision)
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
    return _dot("bcd,bld->blc", att, _flatten(x), precision).astype(x.dtype).reshape(x.shape)
