"""The XLA paths of `attention.dot_product_attention`, with hand-written backward passes: the
whole `[B, N, T, S]` map (weights saved), or blocks of queries (each block's map recomputed).

Legend: B batch, N heads, T query length, S key length, D head dimension. The functions here
take heads first (`[B, N, L, D]`), so no product transposes its operands.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention.functional.blockwise import accumulated_einsum as _product
from flax_attention.kernels import flash


def large_negative(dtype=jnp.float32) -> float:
    """The finite stand-in for -inf in masks: -0.7 * the largest value finite in `dtype` and
    in float32 (the softmax dtype)."""
    return -0.7 * min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))


def _accumulator(dtype) -> jnp.dtype:
    """The dtype of logits, softmax and products: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def _heads_first(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """`[B, L, N, D]` <-> `[B, N, L, D]`: the private functions below take heads first, so no
    product transposes its operands (once per block in the blockwise path)."""
    return tuple(jnp.swapaxes(a, 1, 2) for a in arrays)


def _logits(q, k, mask, bias, precision) -> jax.Array:
    """Scaled, biased, masked logits `[B, N, T, S]` (accumulator dtype) of q `[B, N, T, D]`
    and k `[B, N, S, D]`."""
    logits = jnp.einsum("bntd,bnsd->bnts", q, k, precision=precision,
                        preferred_element_type=_accumulator(q.dtype))
    logits = logits / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, large_negative())
    return logits


def _weights(q, k, mask, bias, precision) -> jax.Array:
    """`dot_product_attention_weights` without the checks; `bias` already finite."""
    return jax.nn.softmax(_logits(q, k, mask, bias, precision), axis=-1)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums `x` over the axes along which `shape` (same rank) was broadcast to it."""
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n != m)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _row(d_out: jax.Array, out: jax.Array, dtype) -> jax.Array:
    """sum_s P_ts dP_ts = dO_t . O_t, `[B, N, T]`: a vector instead of a pass over the map."""
    return jnp.einsum("bntd,bntd->bnt", d_out.astype(dtype), out.astype(dtype))


def _softmax_gradient(weights, d_weights, row, mask) -> jax.Array:
    """dS = P * (dP - row), 0 at masked logits; `row` and `mask` broadcast to P's layout."""
    d_logits = weights * (d_weights - row)
    return d_logits if mask is None else jnp.where(mask, d_logits, 0)


def _gradients(q, k, v, mask, weights, d_out, row, precision):
    """dQ, dK, dV (accumulator dtype) and the logits' gradient dS `[B, N, T, S]` from the
    weights P: the four products dV = P^T dO, dP = dO V^T, dQ = dS K / sqrt(D),
    dK = dS^T Q / sqrt(D) around dS = P * (dP - row), 0 at masked logits."""
    d_v = _product("bnts,bntd->bnsd", weights, d_out, precision)
    d_weights = _product("bntd,bnsd->bnts", d_out, v, precision)
    d_logits = _softmax_gradient(weights, d_weights, row[..., None], mask)
    scaled = d_logits / math.sqrt(q.shape[-1])
    d_q = _product("bnts,bnsd->bntd", scaled, k, precision)
    d_k = _product("bnts,bntd->bnsd", scaled, q, precision)
    return d_q, d_k, d_v, d_logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, bias, precision) -> jax.Array:
    """`dot_product_attention`'s XLA path on the whole map, checked inputs: q `[B, N, T, D]`,
    k and v `[B, N, S, D]`, boolean mask and finite bias broadcastable to `[B, N, T, S]` (or
    None).

    Plain autodiff of the forward pass costs twice its time on the CPU (the softmax's gradient
    through transposed `[B, N, T, S]` maps); this backward pass (`_gradients`) saves the
    weights and runs four products around one fused elementwise pass.
    """
    return _attention_fwd(q, k, v, mask, bias, precision)[0]


def _attention_fwd(q, k, v, mask, bias, precision):
    weights = _weights(q, k, mask, bias, precision)
    out = _product("bnts,bnsd->bntd", weights.astype(v.dtype), v, precision).astype(q.dtype)
    return out, (q, k, v, mask, bias, weights, out)


def _attention_bwd(precision, residuals, d_out):
    q, k, v, mask, bias, weights, out = residuals
    row = _row(d_out, out, weights.dtype)
    d_q, d_k, d_v, d_logits = _gradients(q, k, v, mask, weights, d_out, row, precision)
    d_bias = None if bias is None else _sum_to(d_logits, bias.shape).astype(bias.dtype)
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, d_bias)


_attention.defvjp(_attention_fwd, _attention_bwd)


# --- The blockwise XLA path: blocks of queries -------------------------------------------------
# Logits per block (6 MiB of float32) of `_blocked_attention`. Each block's `[B, N, chunk, S]`
# map then stays in cache between the products and the softmax instead of crossing memory
# several times. On a 2-core CPU at DETR's sizes (B 2, 8 heads of 32, 850 tokens: blocks of
# about 100 queries) the forward pass took 1/1.5 to 1/3 and the forward+backward 1/1.4 to 1/1.8
# of the whole-map path's time (loaded machine, paired runs); blocks of 64 to 128 queries
# measured alike, of 256 (14 MiB) as slow as the whole map.
BLOCK_ELEMENTS = 3 << 19
_MIN_CHUNK = 16


def _chunk(q: jax.Array, k: jax.Array) -> int:
    """Queries per block for q `[B, N, T, D]`, k `[B, N, S, D]`: at most `BLOCK_ELEMENTS`
    logits (and at least `_MIN_CHUNK` queries) a block, evened out so the last block is nearly
    full (850 queries -> 8 blocks of 107, not 7 of 115 and one of 45)."""
    batch, heads, length, _ = q.shape
    most = max(_MIN_CHUNK, BLOCK_ELEMENTS // (batch * heads * k.shape[2]))
    blocks = -(-length // most)
    return -(-length // blocks)


def _blockable(q, k, mask, bias) -> bool:
    """Whether `_blocked_attention` takes these inputs: more than one block of queries, no
    bias, and a mask (if any) that does not vary along the queries."""
    return (_chunk(q, k) < q.shape[2] and bias is None
            and (mask is None or mask.shape[2] == 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q, k, v, mask, precision, chunk: int) -> jax.Array:
    """`_attention` without a bias, for a mask `[B|1, N|1, 1, S|1]`, by `lax.map` over blocks of
    `chunk` queries. Saves each query's largest logit and log-sum of exponentials after it
    `[B, N, T]`, not the weights: the backward pass (`lax.scan` over the same blocks)
    recomputes each block's weights from them (kept apart: summed, a fully masked row, whose
    logits are all the large negative, would lose its log S to rounding)."""
    return _blocked_fwd(q, k, v, mask, precision, chunk)[0]


def _blocked_fwd(q, k, v, mask, precision, chunk: int):
    def block(q_block):
        logits = _logits(q_block, k, mask, None, precision)
        top = logits.max(axis=-1, keepdims=True)
        unnormalized = jnp.exp(logits - top)
        total = unnormalized.sum(axis=-1, keepdims=True)
        weights = (unnormalized / total).astype(v.dtype)
        out = _product("bnts,bnsd->bntd", weights, v, precision).astype(q.dtype)
        return out, top[..., 0], jnp.log(total[..., 0])

    out, top, log_total = (_from_blocks(x, q.shape[2])
                           for x in lax.map(block, _to_blocks(q, chunk)))
    return out, (q, k, v, mask, out, top, log_total)


def _blocked_bwd(precision, chunk: int, residuals, d_out):
    """Each block's map transposed, `[B, N, S, chunk]` (keys first), so that dV and dK, summed
    over the block's queries, contract the map's minor axis: XLA:CPU hands such products to its
    fast library, and those contracting the major axis (here only dQ) to a path ~2x slower."""
    q, k, v, mask, out, top, log_total = residuals
    acc = top.dtype
    mask_t = None if mask is None else jnp.swapaxes(mask, 2, 3)

    def block(carry, blocks):
        q_block, d_out_block, *vectors = blocks
        top_block, log_total_block, row_block = (x[:, :, None] for x in vectors)  # [B,N,1,c]
        weights = jnp.exp((_logits(k, q_block, mask_t, None, precision) - top_block)
                          - log_total_block)
        d_weights = _product("bnsd,bntd->bnst", v, d_out_block, precision)
        d_logits = _softmax_gradient(weights, d_weights, row_block, mask_t)
        d_logits = d_logits / math.sqrt(q.shape[-1])
        d_k = _product("bnst,bntd->bnsd", d_logits, q_block, precision)
        d_v = _product("bnst,bntd->bnsd", weights, d_out_block, precision)
        d_q = _product("bnst,bnsd->bntd", d_logits, k, precision)
        return (carry[0] + d_k, carry[1] + d_v), d_q

    row = _row(d_out, out, acc)
    blocks = tuple(_to_blocks(x, chunk) for x in (q, d_out, top, log_total, row))
    init = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
    (d_k, d_v), d_q = lax.scan(block, init, blocks)
    d_q = _from_blocks(d_q, q.shape[2])
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


def _to_blocks(x: jax.Array, chunk: int) -> jax.Array:
    """`[B, N, T, ...]` -> `[blocks, B, N, chunk, ...]`, zero-padded to whole blocks."""
    return flash.to_blocks(jnp.swapaxes(x, 1, 2), chunk).swapaxes(2, 3)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `_to_blocks`: `[blocks, B, N, chunk, ...]` -> `[B, N, length, ...]`."""
    return jnp.swapaxes(flash.from_blocks(x.swapaxes(2, 3), length), 1, 2)


def xla_attention(q, k, v, mask, bias, precision) -> jax.Array:
    """q `[B, T, N, D]`, k and v `[B, S, N, D]` (checked), boolean mask and finite bias
    broadcastable to `[B, N, T, S]` or None -> `[B, T, N, D]`: block by block when
    `_blockable`, else on the whole map."""
    q, k, v = _heads_first(q, k, v)
    if _blockable(q, k, mask, bias):
        out = _blocked_attention(q, k, v, mask, precision, _chunk(q, k))
    else:
        out = _attention(q, k, v, mask, bias, precision)
    return _heads_first(out)[0]


def attention_weights(q, k, mask, bias, precision) -> jax.Array:
    """The weights `[B, N, T, S]` of q `[B, T, N, D]`, k `[B, S, N, D]` (checked)."""
    return _weights(*_heads_first(q, k), mask, bias, precision)
