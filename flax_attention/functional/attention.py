"""Pure functions: scaled dot-product attention and DETR's position embeddings.

Legend: B batch, H height, W width, C channels, N heads, L length (T query, S key length),
D head dimension.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention._checks import (
    as_float,
    check_nonempty,
    check_positive,
    check_rank,
    check_same,
)
from flax_attention.functional._xla_attention import (
    attention_weights,
    large_negative,
    xla_attention,
)
from flax_attention.kernels._common import pick_implementation

__all__ = [
    "combine_masks",
    "dot_product_attention",
    "dot_product_attention_weights",
    "learned_position_embedding",
    "sine_position_embedding",
]

IMPLEMENTATIONS = ("xla", "cudnn", None)  # of `dot_product_attention`


# --- Validation ----------------------------------------------------------------------------------


def _check_broadcast(name: str, x: jax.Array, target: tuple[int, ...], layout: str) -> None:
    """Raises ValueError unless `x` has the rank of `target` and broadcasts to it dim by dim."""
    check_rank(name, x, len(target), layout)
    if any(d not in (1, t) for d, t in zip(x.shape, target, strict=True)):
        raise ValueError(
            f"{name} must broadcast to {layout} = {target}, got shape {tuple(x.shape)}"
        )


def _check_qk(q: jax.Array, k: jax.Array) -> None:
    check_rank("q", q, 4, "[B, T, N, D]")
    check_rank("k", k, 4, "[B, S, N, D]")
    check_same(
        ("q", "k"),
        ((q.shape[0], *q.shape[2:]), (k.shape[0], *k.shape[2:])),
        "batch, heads and head dimension ([B, _, N, D])",
        (q.shape, k.shape),
    )
    check_nonempty("q", q, "[B, T, N, D]")
    check_nonempty("k", k, "[B, S, N, D]")


def _check_dtypes(**arrays: jax.Array) -> None:
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n} {a.dtype}" for n, a in arrays.items())
        raise ValueError(f"{', '.join(arrays)} must share one dtype; got {listing}")


def _check_mask_bias(q: jax.Array, k: jax.Array, mask, bias) -> None:
    target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    if mask is not None:
        _check_broadcast("mask", mask, target, "[B, N, T, S]")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    if bias is not None:
        _check_broadcast("bias", bias, target, "[B, N, T, S]")


def _finite(bias: jax.Array | None) -> jax.Array | None:
    """Replaces -inf (and anything below it) in an additive bias by the finite large negative."""
    if bias is None:
        return None
    return jnp.maximum(bias, large_negative(bias.dtype))


# --- Attention -----------------------------------------------------------------------------------


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    implementation: str | None = None,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D) + bias, masked) v, per head; `jax.nn.dot_product_attention`.

    Logits and softmax are float32 (float64 for float64 inputs) whatever the input dtype.
    Masked logits are replaced by a finite large negative, and -inf in `bias` is clipped to it,
    so a query whose keys are all masked gets uniform weights (the mean of `v` over all keys),
    never NaN. The XLA path has a hand-written backward pass: the softmax's gradient as
    `P * (dP - rowsum(dP * P))`, with the row sum computed as `d_out . out` per query, in four
    matrix products. Without a bias, and with a mask that does not vary along the queries (key
    padding), queries beyond one block of `_xla_attention.BLOCK_ELEMENTS` logits go block by
    block (each block's map stays in cache; the backward pass recomputes it from each query's
    saved largest logit and log-sum of exponentials); otherwise the whole map is built and its
    weights saved. Differentiable in reverse mode only (`jax.grad`, not `jax.jvp`), as the
    blockwise and criss-cross ops are.

    Args:
      q: queries `[B, T, N, D]`.
      k: keys `[B, S, N, D]`.
      v: values `[B, S, N, D]`, the shape and dtype of `k`.
      mask: boolean, True = attend; broadcastable to `[B, N, T, S]` (rank 4).
      bias: additive logits bias, broadcastable to `[B, N, T, S]` (rank 4).
      implementation: "xla" or None (XLA everywhere), or "cudnn" (cuDNN fused attention on
        NVIDIA GPUs, through `jax.nn.dot_product_attention`).
      precision: of the matrix products (not "cudnn", which keeps its own).

    Returns:
      `[B, T, N, D]` in the dtype of `q` (float32 for integer or boolean `q`, `k`, `v`, which
      are promoted first, as `jax.nn` does).
    """
    q, k, v, bias = map(as_float, (q, k, v, bias))
    _check_qk(q, k)
    check_same(("k", "v"), (k.shape, v.shape), "shape", (k.shape, v.shape))
    _check_dtypes(q=q, k=k, v=v)
    _check_mask_bias(q, k, mask, bias)
    implementation = pick_implementation("dot_product_attention", implementation,
                                         IMPLEMENTATIONS)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=_finite(bias), mask=mask,
                                            implementation="cudnn")
    return xla_attention(q, k, v, mask, _finite(bias), precision)


def dot_product_attention_weights(
    q: jax.Array,
    k: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    precision=None,
) -> jax.Array:
    """The attention weights of `dot_product_attention`, explicitly (to inspect or drop out).

    Args:
      q: queries `[B, T, N, D]`.
      k: keys `[B, S, N, D]`.
      mask: boolean, True = attend; broadcastable to `[B, N, T, S]`.
      bias: additive logits bias, broadcastable to `[B, N, T, S]`.
      precision: of the logits einsum.

    Returns:
      float32 (float64 for float64 inputs) weights `[B, N, T, S]`, each row summing to one
      (uniform where fully masked).
    """
    q, k, bias = map(as_float, (q, k, bias))
    _check_qk(q, k)
    _check_dtypes(q=q, k=k)
    _check_mask_bias(q, k, mask, bias)
    return attention_weights(q, k, mask, _finite(bias), precision)


def _check_masks(key_padding_mask, attn_mask) -> None:
    """`combine_masks`' checks: ranks and dtypes of the two torch-style masks."""
    if key_padding_mask is not None:
        check_rank("key_padding_mask", key_padding_mask, 2, "[B, S]")
        if key_padding_mask.dtype != jnp.bool_:
            raise TypeError("key_padding_mask must be boolean (True = padded key), got dtype "
                            f"{key_padding_mask.dtype}")
    if attn_mask is None:
        return
    if attn_mask.ndim not in (2, 4):
        raise ValueError("attn_mask must have rank 2 ([T, S]) or 4 ([B, N, T, S]), got shape "
                         f"{tuple(attn_mask.shape)} (rank {attn_mask.ndim})")
    if attn_mask.dtype != jnp.bool_ and not jnp.issubdtype(attn_mask.dtype, jnp.floating):
        raise TypeError("attn_mask must be boolean (True = attend) or floating (added to the "
                        f"logits), got dtype {attn_mask.dtype}")


def combine_masks(
    key_padding_mask: jax.Array | None = None, attn_mask: jax.Array | None = None
) -> tuple[jax.Array | None, jax.Array | None]:
    """DETR/torch-style masks as the `mask` and `bias` of `dot_product_attention`.

    Args:
      key_padding_mask: boolean `[B, S]`, True = padded key (torch's convention).
      attn_mask: `[T, S]` or `[B, N, T, S]` (dims may be 1); boolean True = attend (JAX's
        convention, the opposite of torch's boolean attn_mask), or float added to the logits.

    Returns:
      `(mask, bias)`: boolean mask broadcastable to `[B, N, T, S]`, True = attend, and additive
      bias broadcastable to `[B, N, T, S]`; either is None when absent.

    Raises:
      ValueError: `key_padding_mask` not of rank 2, or `attn_mask` not of rank 2 or 4.
      TypeError: `key_padding_mask` not boolean, or `attn_mask` neither boolean nor floating.
    """
    _check_masks(key_padding_mask, attn_mask)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    if attn_mask is None:
        return mask, None
    attn_mask = attn_mask.reshape((1, 1) * (attn_mask.ndim == 2) + attn_mask.shape)
    if attn_mask.dtype != jnp.bool_:
        return mask, attn_mask
    return (attn_mask if mask is None else mask & attn_mask), None


# --- Position embeddings (DETR) ------------------------------------------------------------------


def _interleave_sin_cos(pos: jax.Array, dim_t: jax.Array) -> jax.Array:
    """`[B, H, W]` positions -> `[B, H, W, F]`: sin on even channels, cos on odd ones."""
    angles = pos[..., None] / dim_t
    pairs = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
    return pairs.reshape(angles.shape)


def sine_position_embedding(
    mask: jax.Array,
    num_pos_feats: int = 64,
    temperature: float = 10000.0,
    normalize: bool = False,
    scale: float | None = None,
) -> jax.Array:
    """DETR's sine position embedding of the not-padded pixels.

    Positions are the cumulative counts of not-padded pixels down each column (y) and along each
    row (x), from 1; with `normalize` they are divided by the last count (+1e-6) and multiplied by
    `scale` (2 pi by default). Channel 2i is sin(p / T^(2i/F)), channel 2i+1 is cos(p / T^(2i/F)).

    Args:
      mask: boolean `[B, H, W]`, True where padded (DETR's convention).
      num_pos_feats: F, channels per coordinate (even).
      temperature: T, positive.
      normalize: normalise positions to [0, scale].
      scale: only with `normalize`; defaults to 2 pi.

    Returns:
      float32 `[B, H, W, 2F]`, channels ordered (pos_y, pos_x).
    """
    check_rank("mask", mask, 3, "[B, H, W]")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = padded), got dtype {mask.dtype}")
    if num_pos_feats < 2 or num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
    if scale is not None and not normalize:
        raise ValueError(f"scale ({scale}) is only used with normalize=True")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    scale = 2 * math.pi if scale is None else scale
    not_mask = jnp.logical_not(mask)
    y = jnp.cumsum(not_mask, axis=1, dtype=jnp.float32)
    x = jnp.cumsum(not_mask, axis=2, dtype=jnp.float32)
    if normalize:
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
    exponents = (2 * (np.arange(num_pos_feats) // 2) / num_pos_feats).astype(np.float32)
    dim_t = jnp.power(jnp.float32(temperature), exponents)
    return jnp.concatenate([_interleave_sin_cos(y, dim_t), _interleave_sin_cos(x, dim_t)], -1)


def learned_position_embedding(
    row_embed: jax.Array, col_embed: jax.Array, batch: int, height: int, width: int
) -> jax.Array:
    """DETR's learned position embedding: column then row table entries per pixel.

    Args:
      row_embed: `[R, F]` table indexed by the row (y); R >= height.
      col_embed: `[R, F]` table indexed by the column (x); R >= width.
      batch, height, width: B, H, W of the feature map.

    Returns:
      `[B, H, W, 2F]`, channels ordered (x, y).
    """
    check_rank("row_embed", row_embed, 2, "[R, F]")
    check_rank("col_embed", col_embed, 2, "[R, F]")
    for name, size in (("batch", batch), ("height", height), ("width", width)):
        check_positive(name, size, minimum=0)
    for name, table, size, dim in (("row_embed", row_embed, height, "height"),
                                   ("col_embed", col_embed, width, "width")):
        if size > table.shape[0]:
            raise ValueError(
                f"{dim} ({size}) exceeds the {table.shape[0]} entries of {name} "
                f"(shape {tuple(table.shape)})"
            )
    x = jnp.broadcast_to(col_embed[None, :width], (height, width, col_embed.shape[-1]))
    y = jnp.broadcast_to(row_embed[:height, None], (height, width, row_embed.shape[-1]))
    pos = jnp.concatenate([x, y], axis=-1)
    return jnp.broadcast_to(pos[None], (batch, *pos.shape))
