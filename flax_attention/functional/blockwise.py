"""Pure functions: softmax attention that never holds the whole `[B, Lq, Lk]` map.

The memory-efficient path of DANet's position attention and of the softmax modes of the
non-local block. Axis legend: B batch, Lq query positions, Lk key positions, Ck query/key
channels, Cv value channels (Cv may differ from Ck).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import check_rank, check_same
from flax_attention.kernels import _dispatch, flash

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "accumulated_einsum",
    "attention_logits",
    "attention_weights",
    "blockwise_attention",
]

# Queries per block when no `chunk_size` is given: maps of up to this many query positions are
# built whole, larger ones block by block. Measured on CPU at DANet's widths (64 and 512): blocks
# of 256 to 1024 queries beat the whole map from 32x32 to 97x97 positions (forward 1.1-1.3x,
# forward+backward 1.2-1.4x) and keep memory at 512 * Lk floats instead of Lq * Lk.
DEFAULT_CHUNK_SIZE = 512

_Precision = lax.PrecisionLike


def _accumulator(dtype) -> jnp.dtype:
    """The dtype of logits and softmax: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def accumulated_einsum(spec: str, a: jax.Array, b: jax.Array,
                       precision: _Precision = None) -> jax.Array:
    """`einsum(spec, a, b)` accumulated (and returned) in float32, or float64 for float64 b."""
    return jnp.einsum(spec, a, b, precision=precision,
                      preferred_element_type=_accumulator(b.dtype))


def attention_logits(q: jax.Array, k: jax.Array, *, scale: float | None = None,
                     precision: _Precision = None) -> jax.Array:
    """`scale * q_i . k_j`: q `[B, Lq, Ck]`, k `[B, Lk, Ck]` -> `[B, Lq, Lk]`, float32 (or 64)."""
    logits = accumulated_einsum("bqc,bkc->bqk", q, k, precision)
    return logits if scale is None or scale == 1.0 else logits * scale


def attention_weights(q: jax.Array, k: jax.Array, *, scale: float | None = None,
                      precision: _Precision = None) -> jax.Array:
    """The whole map: softmax over keys of `attention_logits`, `[B, Lq, Lk]`, float32 (or 64)."""
    return jax.nn.softmax(attention_logits(q, k, scale=scale, precision=precision), axis=-1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
            precision: _Precision) -> jax.Array:
    """The dense path: `[B, Lq, Ck]`, `[B, Lk, Ck]`, `[B, Lk, Cv]` -> `[B, Lq, Cv]`, v's dtype."""
    att = attention_weights(q, k, scale=scale, precision=precision).astype(v.dtype)
    return accumulated_einsum("bqk,bkc->bqc", att, v, precision).astype(v.dtype)


# --- The blockwise path: blocks of queries, with a flash-attention style backward pass. ------


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static arguments of `_attend_blockwise`."""

    scale: float
    chunk_size: int  # queries per block of the XLA forward and of the backward
    precision: _Precision
    pallas: bool  # the forward pass by the Pallas flash kernel, else by `lax.map` in XLA


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


def _chunked_forward(q: jax.Array, k: jax.Array, v: jax.Array,
                     config: _Config) -> tuple[jax.Array, jax.Array]:
    """`_attend(q, k, v)` by `lax.map` over query blocks, and the log-sum-exp `[B, Lq]`."""

    def block(qb: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = attention_logits(qb, k, scale=config.scale, precision=config.precision)
        top = logits.max(axis=-1, keepdims=True)
        p = jnp.exp(logits - top)
        total = p.sum(axis=-1, keepdims=True)
        out = accumulated_einsum("bqk,bkc->bqc", p.astype(v.dtype), v, config.precision) / total
        return out.astype(v.dtype), (top + jnp.log(total))[..., 0]

    out, lse = lax.map(block, _blocks(q, config.chunk_size))
    return _unblocks(out, q.shape[1]), _unblocks(lse, q.shape[1])


def _forward(q: jax.Array, k: jax.Array, v: jax.Array,
             config: _Config) -> tuple[jax.Array, jax.Array]:
    """The output and the log-sum-exp of every query's logits, by the configured forward."""
    if config.pallas:
        return flash.flash_attention_forward(q, k, v, scale=config.scale,
                                             precision=config.precision,
                                             interpret=_dispatch.interpret())
    return _chunked_forward(q, k, v, config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, config: _Config) -> jax.Array:
    """`_attend` block by block. The backward pass recomputes each block of queries' map from
    the saved log-sum-exp, so neither pass holds more than a `[B, chunk_size, Lk]` map."""
    return _forward(q, k, v, config)[0]


def _attend_blockwise_fwd(q: jax.Array, k: jax.Array, v: jax.Array,
                          config: _Config) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = _forward(q, k, v, config)
    return out, (q, k, v, out, lse)


def _attend_blockwise_bwd(config: _Config, residuals: tuple[jax.Array, ...],
                          d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, out, lse = residuals
    acc, precision = _accumulator(v.dtype), config.precision
    # sum_j att_ij d(att_ij) = d_out_i . out_i: a [B, Lq] vector instead of a pass over the map.
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)

    def block(carry, xs):
        dk, dv = carry
        qb, d_outb, lseb, deltab = xs
        logits = attention_logits(qb, k, scale=config.scale, precision=precision)
        att = jnp.exp(logits - lseb[..., None])
        dv = dv + accumulated_einsum("bqk,bqc->bkc", att.astype(v.dtype), d_outb, precision)
        d_att = accumulated_einsum("bqc,bkc->bqk", d_outb, v, precision)
        d_logits = (att * (d_att - deltab[..., None]) * config.scale).astype(q.dtype)
        dk = dk + accumulated_einsum("bqk,bqc->bkc", d_logits, qb, precision)
        return (dk, dv), accumulated_einsum("bqk,bkc->bqc", d_logits, k, precision)

    xs = tuple(_blocks(x, config.chunk_size) for x in (q, d_out, lse, delta))
    init = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
    (dk, dv), dq = lax.scan(block, init, xs)
    return _unblocks(dq, q.shape[1]).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attend_blockwise.defvjp(_attend_blockwise_fwd, _attend_blockwise_bwd)


# --- Dispatch ---------------------------------------------------------------------------------


def _cudnn_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """cuDNN's flash attention: equal widths, a multiple of 8 up to 128, half precision."""
    width = q.shape[-1]
    return (width == v.shape[-1] and width % 8 == 0 and width <= 128
            and q.dtype in (jnp.bfloat16, jnp.float16))


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """`jax.nn.dot_product_attention` with cuDNN, one head."""
    q, k, v = (a[:, :, None, :] for a in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")[:, :, 0]


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int | None) -> None:
    check_rank("q", q, 3, "[B, Lq, Ck]")
    check_rank("k", k, 3, "[B, Lk, Ck]")
    check_rank("v", v, 3, "[B, Lk, Cv]")
    check_same(("q", "k"), ((q.shape[0], q.shape[2]), (k.shape[0], k.shape[2])),
               "batch and channels", (q.shape, k.shape))
    check_same(("k", "v"), (k.shape[:2], v.shape[:2]), "batch and key positions",
               (k.shape, v.shape))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        scale: float | None = None, chunk_size: int | None = None,
                        implementation: str | None = None,
                        precision: _Precision = None) -> jax.Array:
    """Softmax attention `out_i = sum_j softmax_j(scale * q_i . k_j) v_j`, in O(Lq) memory.

    Logits and softmax are float32 (float64 for float64 inputs) whatever the input dtype.

    Paths:
      - "xla" (and None off the GPU): with at most `chunk_size` queries the whole `[B, Lq, Lk]`
        map is built (plain autodiff). With more, the queries go in blocks of `chunk_size`
        through `lax.map`, and a `custom_vjp` recomputes each block's map in the backward pass
        from the saved log-sum-exp (as flash attention does): at most a `[B, chunk_size, Lk]` map
        is alive in either pass.
      - "pallas": the forward pass by the Pallas flash kernel (`kernels/flash.py`), the backward
        pass the blockwise one above from the kernel's log-sum-exp; interpreted off the GPU.
      - None on a GPU: cuDNN's flash attention (`jax.nn.dot_product_attention`) when Ck == Cv is
        a multiple of 8 up to 128 and the inputs are bfloat16/float16, else the Pallas kernel
        when it takes the inputs (not float64; Ck <= `flash.MAX_QK_CHANNELS`), else "xla".
    The blockwise paths are differentiable in reverse mode only (`jax.grad`, not `jax.jvp`).

    Args:
      q: queries `[B, Lq, Ck]`.
      k: keys `[B, Lk, Ck]`.
      v: values `[B, Lk, Cv]`.
      scale: multiplies the logits; None for 1 (DANet and the non-local block do not scale).
      chunk_size: queries per block of the XLA path and of the blockwise backward pass; None
        for `DEFAULT_CHUNK_SIZE`.
      implementation: None, "xla" or "pallas" (see above).
      precision: of the matrix products.

    Returns:
      `[B, Lq, Cv]` in the dtype of `q`, `k` and `v` promoted together.

    Raises:
      ValueError: wrong ranks, q and k differ in batch or channels, k and v in batch or key
        positions, a non-positive `chunk_size`, an unknown `implementation`, or "pallas" for
        inputs the kernel does not take.
    """
    _check_inputs(q, k, v, chunk_size)
    pallas = _dispatch.use_pallas(implementation, flash.unsupported(q, k, v))
    dtype = jnp.result_type(q, k, v)
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    scale = 1.0 if scale is None else float(scale)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if implementation is None and _dispatch.on_gpu() and _cudnn_supported(q, k, v):
        return _cudnn(q, k, v, scale)
    if not pallas and chunk_size >= q.shape[1]:
        return _attend(q, k, v, scale, precision)
    return _attend_blockwise(q, k, v, _Config(scale, chunk_size, precision, pallas))
