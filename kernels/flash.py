"""Flash-attention forward pass as a Pallas kernel, with value widths unlike the key widths.

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

Axis legend: B batch, Lq query positions, Lk key positions, Ck query/key channels, Cv value
channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "MAX_QK_CHANNELS",
    "BlockSizes",
    "flash_attention_forward",
    "flash_attention_reference",
    "unsupported",
]

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# A query block and a key block of this width stay in registers/shared memory together.
MAX_QK_CHANNELS = 512
# Triton's `tl.dot` needs every dimension of a tile to be at least 16.
_MIN_BLOCK = 16


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
            if size < _MIN_BLOCK or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {size}")

    def fitted(self, lq: int, lk: int, cv: int) -> BlockSizes:
        """The same sizes, shrunk (to powers of two >= 16) where an input is smaller."""

        def fit(block: int, n: int) -> int:
            return min(block, max(_MIN_BLOCK, pl.next_power_of_2(n)))

        return dataclasses.replace(self, block_q=fit(self.block_q, lq),
                                   block_k=fit(self.block_k, lk),
                                   block_cv=fit(self.block_cv, cv))


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array) -> str | None:
    """Why `flash_attention_forward` cannot take these inputs, or None when it can."""
    dtype = jnp.result_type(q, k, v)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (the flash kernel takes float32, bfloat16 or float16)"
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
    ck_pad = max(_MIN_BLOCK, pl.next_power_of_2(ck))
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
