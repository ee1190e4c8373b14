"""Flash attention as a Pallas kernel, with value widths unlike the key widths.

`out = softmax(scale * q k^T) v` by online softmax (Dao et al., "FlashAttention", NeurIPS 2022):
each program holds one block of queries and one block of value channels, walks every block of
keys keeping the running row maximum, the running sum of exponentials and the unnormalised
output, and writes the output and the log-sum-exp of each query's logits (what a backward pass
needs to rebuild the map block by block). No more than a `[block_q, block_k]` tile of the map
ever exists.

Unlike `jax.experimental.pallas.ops.gpu.attention`, the value width Cv may differ from the
query/key width Ck (DANet's PAM: 64 vs 512): Cv is tiled over a grid axis, so a wide value does
not have to fit one program's registers; the logits of a query block are recomputed per value
block (cheap: Ck is the small width). Ragged sizes are zero-padded to whole blocks, padded keys
are masked with a finite large negative, and padded rows and columns are sliced off.

The backward pass (`flash_attention_backward`) is XLA for now: it recomputes the map of each
block of `chunk_size` queries from the saved log-sum-exp (never more than a `[B, chunk_size,
Lk]` map); `functional.blockwise` reuses it behind its XLA forward. `flash_attention` is the
kernel behind `jax.custom_vjp`; `flash_attention_reference` the plain XLA math it must equal.

Axis legend: B batch, Lq query positions, Lk key positions, Ck query/key channels, Cv value
channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flax_attention.kernels._common import MASK_VALUE, MIN_BLOCK, dtype_unsupported

__all__ = [
    "MAX_QK_CHANNELS",
    "BlockSizes",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "flash_attention_reference",
    "from_blocks",
    "to_blocks",
    "unsupported",
]

# A query block and a key block of this width stay in registers/shared memory together.
MAX_QK_CHANNELS = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernel: powers of two, at least 16 (Triton's smallest dot tile).

    Attributes:
      block_q: queries per program.
      block_k: keys per step of a program's loop.
      block_cv: value channels per program (the third grid axis).
      num_warps, num_stages: Triton's launch parameters (ignored in interpret mode).
    """

    block_q: int = 64
    block_k: int = 64
    block_cv: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "block_cv"):
            size = getattr(self, name)
            if size < MIN_BLOCK or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {size}")

    def fitted(self, lq: int, lk: int, cv: int) -> BlockSizes:
        """The same sizes, shrunk (to powers of two >= 16) where an input is smaller."""

        def fit(block: int, n: int) -> int:
            return min(block, max(MIN_BLOCK, pl.next_power_of_2(n)))

        return dataclasses.replace(self, block_q=fit(self.block_q, lq),
                                   block_k=fit(self.block_k, lk),
                                   block_cv=fit(self.block_cv, cv))


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Why `flash_attention_forward` cannot take these inputs, or None when it can."""
    reason = dtype_unsupported(q=q, k=k, v=v)
    if reason is not None:
        return reason
    if q.shape[-1] > MAX_QK_CHANNELS:
        return f"q/k channels {q.shape[-1]} above the flash kernel's {MAX_QK_CHANNELS}"
    return None


def _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *, scale: float, num_keys: int,
            block_k: int, precision: lax.PrecisionLike) -> None:
    """One (batch, query block, value-channel block) program: the online softmax over keys."""
    q = q_ref[...]
    block_q, padded_keys = q.shape[0], k_ref.shape[0]

    def step(i, carry):
        acc, top, total = carry
        start = pl.multiple_of(i * block_k, block_k)
        k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        if scale != 1.0:
            logits = logits * scale
        if padded_keys != num_keys:
            keys = start + jnp.arange(block_k)[None, :]
            logits = jnp.where(keys < num_keys, logits, MASK_VALUE)
        new_top = jnp.maximum(top, logits.max(axis=-1))
        correction = jnp.exp(top - new_top)
        p = jnp.exp(logits - new_top[:, None])
        total = total * correction + p.sum(axis=-1)
        update = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)
        return acc * correction[:, None] + update, new_top, total

    init = (jnp.zeros((block_q, out_ref.shape[-1]), jnp.float32),
            jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, top, total = lax.fori_loop(0, padded_keys // block_k, step, init)
    out_ref[...] = (acc / total[:, None]).astype(out_ref.dtype)
    lse_ref[...] = top + jnp.log(total)


def _kernel_precision(precision: lax.PrecisionLike) -> lax.PrecisionLike:
    """`precision`, or for None the `jax_default_matmul_precision` setting: XLA applies that
    setting when it lowers a dot, the Triton lowering does not (it would use TF32)."""
    default = jax.config.jax_default_matmul_precision
    if precision is not None or default is None:
        return precision
    try:
        return lax.Precision(default)
    except ValueError:  # a dot algorithm name: left to the backend's default
        return None


def _pad_to(x: jax.Array, length: int, channels: int) -> jax.Array:
    """Zero-pads `[B, L, C]` to `[B, length, channels]` (no copy when nothing is missing)."""
    pad = ((0, 0), (0, length - x.shape[1]), (0, channels - x.shape[2]))
    return jnp.pad(x, pad) if any(p[1] for p in pad) else x


def _round_up(n: int, block: int) -> int:
    return pl.cdiv(n, block) * block


@functools.partial(jax.jit, static_argnames=("scale", "precision", "block_sizes", "interpret"))
def flash_attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float = 1.0,
                            precision: lax.PrecisionLike = None,
                            block_sizes: BlockSizes | None = None,
                            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Softmax attention and the log-sum-exp of the logits, by the Pallas kernel.

    Args:
      q: queries `[B, Lq, Ck]`.
      k: keys `[B, Lk, Ck]`.
      v: values `[B, Lk, Cv]`, the dtype of `q` and `k`.
      scale: multiplies the logits `q_i . k_j`.
      precision: of the two matrix products in the kernel.
      block_sizes: tiles; None for `BlockSizes()`. Shrunk for inputs smaller than a tile.
      interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.

    Returns:
      out `[B, Lq, Cv]` in v's dtype, and lse `[B, Lq]` float32: `log sum_j exp(logit_ij)`.
    """
    (batch, lq, ck), (lk, cv) = q.shape, v.shape[1:]
    blocks = (block_sizes or BlockSizes()).fitted(lq, lk, cv)
    bq, bk, bcv = blocks.block_q, blocks.block_k, blocks.block_cv
    lq_pad, lk_pad, cv_pad = _round_up(lq, bq), _round_up(lk, bk), _round_up(cv, bcv)
    ck_pad = max(MIN_BLOCK, pl.next_power_of_2(ck))
    kernel = functools.partial(_kernel, scale=scale, num_keys=lk, block_k=bk,
                               precision=_kernel_precision(precision))
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, lq_pad // bq, cv_pad // bcv),
        in_specs=[
            pl.BlockSpec((None, bq, ck_pad), lambda b, i, j: (b, i, 0)),
            pl.BlockSpec((None, lk_pad, ck_pad), lambda b, i, j: (b, 0, 0)),
            pl.BlockSpec((None, lk_pad, bcv), lambda b, i, j: (b, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, bcv), lambda b, i, j: (b, i, j)),
            pl.BlockSpec((None, bq), lambda b, i, j: (b, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, lq_pad, cv_pad), v.dtype),
                   jax.ShapeDtypeStruct((batch, lq_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="flash_attention_forward",
    )(_pad_to(q, lq_pad, ck_pad), _pad_to(k, lk_pad, ck_pad), _pad_to(v, lk_pad, cv_pad))
    return out[:, :lq, :cv], lse[:, :lq]


# --- the backward pass (XLA, block by block), the custom VJP and the reference ---------------


def to_blocks(x: jax.Array, chunk_size: int) -> jax.Array:
    """`[B, L, ...]` -> `[blocks, B, chunk_size, ...]`, zero-padded to whole blocks."""
    blocks = -(-x.shape[1] // chunk_size)
    pad = [(0, 0), (0, blocks * chunk_size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad).reshape(x.shape[0], blocks, chunk_size, *x.shape[2:])
    return x.swapaxes(0, 1)


def from_blocks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `to_blocks`: `[blocks, B, chunk_size, ...]` -> `[B, length, ...]`."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _einsum(spec: str, a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """Accumulated in float32 (float64 for float64 b)."""
    return jnp.einsum(spec, a, b, precision=precision,
                      preferred_element_type=jnp.promote_types(b.dtype, jnp.float32))


def flash_attention_backward(q, k, v, out, lse, d_out, *, scale: float, chunk_size: int,
                             precision: lax.PrecisionLike = None):
    """The cotangents of q `[B, Lq, Ck]`, k `[B, Lk, Ck]` and v `[B, Lk, Cv]` from the output
    and its cotangent `[B, Lq, Cv]` and the log-sum-exp `[B, Lq]`, by blocks of `chunk_size`
    queries (`lax.scan`), each block's map recomputed from the log-sum-exp.

    Each block's map is built keys first, `[B, Lk, chunk]`, so that dV and dK, summed over the
    block's queries, contract its minor axis: XLA:CPU hands such products to its fast library
    and those contracting the major axis to a slower path. At DANet's PAM sizes (Ck 64, Cv 512)
    this backward pass took 0.7x the time of the queries-first one on a 2-core CPU (4096
    positions: 481 -> 378 and 463 -> 321 ms in two runs; 9409: 2311 -> 1643 ms). dQ, which
    contracts the map's major axis, is computed transposed, `(K^T dS)^T`: the same sums, and
    XLA:CPU ran the product into a `[Ck, chunk]` block in half the time of the one into
    `[chunk, Ck]` (PAM, a block of 512 queries: 4.3 -> 2.1 ms at 4096 positions, 9.9 -> 4.8 ms
    at 9409; the non-local block's 1024 keys of width 256: 2.1 -> 1.9 ms).
    """
    acc = jnp.promote_types(v.dtype, jnp.float32)
    # sum_j att_ij d(att_ij) = d_out_i . out_i: a [B, Lq] vector instead of a pass over the map.
    delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)

    def block(carry, xs):
        dk, dv = carry
        qb, d_outb, lseb, deltab = xs
        logits = _einsum("bkc,bqc->bkq", k, qb, precision)
        logits = logits if scale == 1.0 else logits * scale
        att = jnp.exp(logits - lseb[:, None, :])
        dv = dv + _einsum("bkq,bqc->bkc", att.astype(v.dtype), d_outb, precision)
        d_att = _einsum("bkc,bqc->bkq", v, d_outb, precision)
        d_logits = (att * (d_att - deltab[:, None, :]) * scale).astype(q.dtype)
        dk = dk + _einsum("bkq,bqc->bkc", d_logits, qb, precision)
        return (dk, dv), jnp.swapaxes(_einsum("bkc,bkq->bcq", k, d_logits, precision), 1, 2)

    xs = tuple(to_blocks(x, chunk_size) for x in (q, d_out, lse, delta))
    init = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
    (dk, dv), dq = lax.scan(block, init, xs)
    return from_blocks(dq, q.shape[1]).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static arguments of `_flash`."""

    scale: float
    chunk_size: int
    precision: lax.PrecisionLike
    block_sizes: BlockSizes | None
    interpret: bool

    def forward(self, q, k, v):
        return flash_attention_forward(q, k, v, scale=self.scale, precision=self.precision,
                                       block_sizes=self.block_sizes, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, config: _Config):
    return config.forward(q, k, v)[0]


def _flash_fwd(q, k, v, config: _Config):
    out, lse = config.forward(q, k, v)
    return out, (q, k, v, out, lse)


def _flash_bwd(config: _Config, residuals, d_out):
    return flash_attention_backward(*residuals, d_out, scale=config.scale,
                                    chunk_size=config.chunk_size, precision=config.precision)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float = 1.0,
                    chunk_size: int = 512, precision: lax.PrecisionLike = None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """`softmax(scale * q k^T) v` by the kernel; reverse-mode differentiable (the backward is
    `flash_attention_backward`).

    Args:
      q: queries `[B, Lq, Ck]`.
      k: keys `[B, Lk, Ck]`.
      v: values `[B, Lk, Cv]`, the dtype of `q` and `k`.
      scale: multiplies the logits.
      chunk_size: queries per block of the backward pass.
      precision: of the matrix products.
      block_sizes: the kernel's tiles; None for `BlockSizes()`.
      interpret: run the Pallas interpreter (any platform) instead of compiling for the GPU.

    Returns:
      `[B, Lq, Cv]` in v's dtype.

    Raises:
      ValueError: inputs the kernel does not support (see `unsupported`).
    """
    reason = unsupported(q, k, v)
    if reason is not None:
        raise ValueError(f"flash attention Pallas kernel: {reason}")
    return _flash(q, k, v, _Config(float(scale), chunk_size, precision, block_sizes, interpret))


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float = 1.0,
                              precision: lax.PrecisionLike = None
                              ) -> tuple[jax.Array, jax.Array]:
    """What `flash_attention_forward` computes, with the whole `[B, Lq, Lk]` map in XLA."""
    logits = scale * jnp.einsum("bqc,bkc->bqk", q, k, precision=precision,
                                preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    att = jnp.exp(logits - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", att, v, precision=precision,
                     preferred_element_type=jnp.float32)
    return out.astype(v.dtype), lse
