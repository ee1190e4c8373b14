"""Pure functions: softmax attention that never holds the whole `[B, Lq, Lk]` map.

The memory-efficient path of DANet's position attention and of the softmax modes of the
non-local block. Axis legend: B batch, Lq query positions, Lk key positions, Ck query/key
channels, Cv value channels (Cv may differ from Ck).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_nonempty, check_rank, check_same
from flax_attention.kernels import flash
from flax_attention.kernels._common import on_gpu, pick_implementation

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IMPLEMENTATIONS",
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
IMPLEMENTATIONS = ("xla", "pallas", "cudnn", None)  # of `blockwise_attention`

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


# --- The blockwise XLA path: blocks of queries, with the flash kernel's backward pass. --------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk_size: int,
                      precision: _Precision) -> jax.Array:
    """`_attend` block by block. The backward pass (`flash.flash_attention_backward`)
    recomputes each block of queries' map from the saved log-sum-exp, so neither pass holds
    more than a `[B, chunk_size, Lk]` map."""
    return _chunked_forward(q, k, v, scale, chunk_size, precision)[0]


def _chunked_forward(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk_size: int,
                     precision: _Precision) -> tuple[jax.Array, jax.Array]:
    """`_attend(q, k, v)` by `lax.map` over query blocks, and the log-sum-exp `[B, Lq]`."""

    def block(qb: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = attention_logits(qb, k, scale=scale, precision=precision)
        top = logits.max(axis=-1, keepdims=True)
        p = jnp.exp(logits - top)
        total = p.sum(axis=-1, keepdims=True)
        out = accumulated_einsum("bqk,bkc->bqc", p.astype(v.dtype), v, precision) / total
        return out.astype(v.dtype), (top + jnp.log(total))[..., 0]

    out, lse = lax.map(block, flash.to_blocks(q, chunk_size))
    return flash.from_blocks(out, q.shape[1]), flash.from_blocks(lse, q.shape[1])


def _attend_blockwise_fwd(q, k, v, scale, chunk_size, precision):
    out, lse = _chunked_forward(q, k, v, scale, chunk_size, precision)
    return out, (q, k, v, out, lse)


def _attend_blockwise_bwd(scale, chunk_size, precision, residuals, d_out):
    return flash.flash_attention_backward(*residuals, d_out, scale=scale, chunk_size=chunk_size,
                                          precision=precision)


_attend_blockwise.defvjp(_attend_blockwise_fwd, _attend_blockwise_bwd)


# --- Dispatch ---------------------------------------------------------------------------------


def _cudnn_unsupported(q: jax.Array, v: jax.Array) -> str | None:
    """Why cuDNN's flash attention cannot take these inputs (it needs an NVIDIA GPU, equal
    widths Ck == Cv, a multiple of 8 up to 128, bfloat16 or float16), or None."""
    width = q.shape[-1]
    if not on_gpu():
        return "cuDNN needs an NVIDIA GPU"
    if not (width == v.shape[-1] and width % 8 == 0 and width <= 128):
        return f"q/k channels {width} and v channels {v.shape[-1]} (cuDNN: equal, 8k <= 128)"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cuDNN: bfloat16 or float16)"
    return None


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
    for name, x, layout in (("q", q, "[B, Lq, Ck]"), ("v", v, "[B, Lk, Cv]")):
        check_nonempty(name, x, layout)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        scale: float | None = None, chunk_size: int | None = None,
                        implementation: str | None = None,
                        precision: _Precision = None) -> jax.Array:
    """Softmax attention `out_i = sum_j softmax_j(scale * q_i . k_j) v_j`, in O(Lq) memory.

    Logits and softmax are float32 (float64 for float64 inputs) whatever the input dtype.

    Paths (`implementation`):
      - "xla", and None (no kernel has been timed on a GPU yet): with at most `chunk_size`
        queries the whole `[B, Lq, Lk]` map is built (plain autodiff). With more, the queries go
        in blocks of `chunk_size` through `lax.map`, and a `custom_vjp` recomputes each block's
        map in the backward pass from the saved log-sum-exp (as flash attention does): at most
        a `[B, chunk_size, Lk]` map is alive in either pass.
      - "pallas": `flash.flash_attention`, the forward pass by the Pallas flash kernel
        (interpreted off the GPU), the backward pass the blockwise one above from the kernel's
        log-sum-exp. Not float64; Ck <= `flash.MAX_QK_CHANNELS`.
      - "cudnn": cuDNN's flash attention (`jax.nn.dot_product_attention`), on an NVIDIA GPU,
        for Ck == Cv a multiple of 8 up to 128 and bfloat16/float16 inputs; `chunk_size` unused.
    The blockwise paths are differentiable in reverse mode only (`jax.grad`, not `jax.jvp`).

    Args:
      q: queries `[B, Lq, Ck]`.
      k: keys `[B, Lk, Ck]`.
      v: values `[B, Lk, Cv]`.
      scale: multiplies the logits; None for 1 (DANet and the non-local block do not scale).
      chunk_size: queries per block of the XLA path and of the blockwise backward pass; None
        for `DEFAULT_CHUNK_SIZE`.
      implementation: "xla", "pallas", "cudnn" or None (see above).
      precision: of the matrix products.

    Returns:
      `[B, Lq, Cv]` in the dtype of `q`, `k` and `v` promoted together (integer and boolean
      inputs are promoted to float32 first).

    Raises:
      ValueError: wrong ranks, q and k differ in batch or channels, k and v in batch or key
        positions, a zero-size dimension, a non-positive `chunk_size`, an unknown
        `implementation`, or "pallas" or "cudnn" for inputs they do not take.
    """
    q, k, v = map(as_float, (q, k, v))
    _check_inputs(q, k, v, chunk_size)
    dtype = jnp.result_type(q, k, v)
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    reasons = {"pallas": flash.unsupported(q, k, v), "cudnn": _cudnn_unsupported(q, v)}
    path = pick_implementation("blockwise_attention", implementation, IMPLEMENTATIONS, reasons)
    scale = 1.0 if scale is None else float(scale)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if path == "cudnn":
        return _cudnn(q, k, v, scale)
    if path == "pallas":
        return flash.flash_attention(q, k, v, scale=scale, chunk_size=chunk_size,
                                     precision=precision, interpret=not on_gpu())
    if chunk_size >= q.shape[1]:
        return _attend(q, k, v, scale, precision)
    return _attend_blockwise(q, k, v, scale, chunk_size, precision)
