"""Pure functions: global context attention (Cao, Xu, Lin, Wei, Hu: "GCNet: Non-local Networks
Meet Squeeze-Excitation Networks and Beyond", ICCV-W 2019), in the form of timm's
`timm/layers/global_context.py` (`GlobalContext`).

Axis legend: B batch, H height, W width, C channels. The context modelling (a softmax over
every position of one logit map, then the softmax-weighted sum of `x`) and the fusion (`x`
scaled by a gate and/or shifted by a vector per channel) are here; the 1x1 convolutions and
the LayerNorm of the transform MLPs own parameters, so they live in the module
(`flax_attention.global_context`), which passes them in as functions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_rank, check_same

__all__ = [
    "fuse_context",
    "global_context",
    "global_context_pool",
    "global_context_weights",
]

VectorFn = Callable[[jax.Array], jax.Array]


def _stats_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def global_context_weights(logits: jax.Array) -> jax.Array:
    """GCNet's context weights: a softmax over all H * W positions of each sample, in float32.

    Args:
      logits: `[B, H, W]`, the output of the C -> 1 `conv_attn`.

    Returns:
      `[B, H, W]` in float32 (float64 for float64 logits), summing to 1 per sample.
    """
    logits = as_float(logits)
    check_rank("logits", logits, 3, "[B, H, W]")
    b, h, w = logits.shape
    flat = logits.reshape(b, h * w).astype(_stats_dtype(logits))
    return jax.nn.softmax(flat, axis=-1).reshape(b, h, w)


def global_context_pool(x: jax.Array, weights: jax.Array,
                   precision: lax.PrecisionLike = None) -> jax.Array:
    """The global context: the sum over positions of `x` weighted by `weights`, in float32.

    Args:
      x: `[B, H, W, C]`.
      weights: `[B, H, W]`, e.g. `global_context_weights(logits)`.
      precision: of the weighted sum.

    Returns:
      `[B, C]` in float32 (float64 for float64 inputs).
    """
    x, weights = map(as_float, (x, weights))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("weights", weights, 3, "[B, H, W]")
    check_same(("x", "weights"), (x.shape[:3], weights.shape), "batch and spatial dimensions",
               (x.shape, weights.shape))
    dtype = _stats_dtype(x)
    return jnp.einsum("bhwc,bhw->bc", x, weights.astype(dtype), precision=precision,
                      preferred_element_type=dtype)


def fuse_context(x: jax.Array, scale: jax.Array | None = None,
                 add: jax.Array | None = None) -> jax.Array:
    """GCNet's fusion: `x * scale + add`, each vector broadcast over the positions.

    Args:
      x: `[B, H, W, C]`.
      scale: `[B, C]` or None (no scaling), e.g. the sigmoid gate of `mlp_scale`.
      add: `[B, C]` or None (no addition), e.g. the output of `mlp_add`.

    Returns:
      `[B, H, W, C]` in x's dtype.
    """
    x, scale, add = map(as_float, (x, scale, add))
    check_rank("x", x, 4, "[B, H, W, C]")
    for name, v in (("scale", scale), ("add", add)):
        if v is not None:
            check_rank(name, v, 2, "[B, C]")
            check_same(("x", name), ((x.shape[0], x.shape[3]), v.shape), "batch and channels",
                       (x.shape, v.shape))
    if scale is not None:
        x = x * scale.astype(x.dtype)[:, None, None, :]
    if add is not None:
        x = x + add.astype(x.dtype)[:, None, None, :]
    return x


def global_context(
    x: jax.Array,
    logits: jax.Array | None,
    mlp_scale: VectorFn | None = None,
    mlp_add: VectorFn | None = None,
    gate: VectorFn = jax.nn.sigmoid,
    precision: lax.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The global context block: context modelling, transform, fusion.

    The context is `global_context_pool(x, global_context_weights(logits))`, or the plain
    spatial mean when `logits` is None (timm's `use_attn=False`); then
    `out = x * gate(mlp_scale(context)) + mlp_add(context)`, either term left out when its MLP
    is None.

    Args:
      x: `[B, H, W, C]`.
      logits: `[B, H, W]` attention logits, or None for average pooling.
      mlp_scale: `[B, C]` -> `[B, C]`, the transform of the scaling fusion, or None.
      mlp_add: `[B, C]` -> `[B, C]`, the transform of the additive fusion, or None.
      gate: the gate of the scaling fusion (timm's `gate_layer`, sigmoid by default).
      precision: of the attention pooling.

    Returns:
      `out` `[B, H, W, C]` in x's dtype, and the context weights `[B, H, W]` (float32) or None.
    """
    x, logits = map(as_float, (x, logits))
    check_rank("x", x, 4, "[B, H, W, C]")
    if logits is None:
        weights = None
        context = jnp.mean(x, axis=(1, 2), dtype=_stats_dtype(x))
    else:
        check_same(("x", "logits"), (x.shape[:3], logits.shape), "batch and spatial dimensions",
                   (x.shape, logits.shape))
        weights = global_context_weights(logits)
        context = global_context_pool(x, weights, precision)
    scale = None if mlp_scale is None else gate(mlp_scale(context).astype(context.dtype))
    add = None if mlp_add is None else mlp_add(context)
    return fuse_context(x, scale, add), weights
