"""Pure functions: CBAM, the convolutional block attention module (Woo, Park, Lee, Kweon:
"CBAM: Convolutional Block Attention Module", ECCV 2018), in the form of timm's
`timm/layers/cbam.py` (`CbamModule`, and its experimental `LightCbamModule`).

Axis legend: B batch, H height, W width, C channels. The pooling (over positions for the
channel gate, over channels for the spatial gate), the combination of the pooled branches and
the gating are here; the shared MLP and the 7x7 convolution + BatchNorm own parameters (and
batch statistics), so they live in the module (`flax_attention.cbam`), which passes them in as
functions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flax_attention._checks import as_float, check_image, check_rank, check_same
from flax_attention.functional.squeeze_excitation import (
    channel_max,
    excite,
    spatial_max,
    spatial_mean,
)

__all__ = [
    "cbam",
    "cbam_channel_gates",
    "cbam_spatial_pool",
    "spatial_excite",
]

ArrayFn = Callable[[jax.Array], jax.Array]


def _stats_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def cbam_channel_gates(x: jax.Array, mlp: ArrayFn, gate: ArrayFn = jax.nn.sigmoid,
                  light: bool = False) -> jax.Array:
    """CBAM's channel attention: `gate(mlp(avg_pool(x)) + mlp(max_pool(x)))`.

    The pools (over every position) run in float32. `light` is timm's `LightChannelAttn`: one
    MLP pass on `0.5 * avg + 0.5 * max`.

    Args:
      x: `[B, H, W, C]`.
      mlp: `[N, C]` -> `[N, C]`, the shared MLP (timm's `fc1`, activation, `fc2`).
      gate: the gate (timm's `gate_layer`, sigmoid by default).
      light: pool first, then one MLP pass.

    Returns:
      `[B, C]` gates in float32 (float64 for float64 inputs).
    """
    x = as_float(x)
    check_image("x", x)
    dtype = _stats_dtype(x)
    avg = spatial_mean(x, dtype)
    peak = spatial_max(x).astype(dtype)
    if light:
        logits = mlp(0.5 * avg + 0.5 * peak)
    else:
        b = x.shape[0]
        both = mlp(jnp.concatenate([avg, peak]))  # one pass of the shared MLP for both pools
        logits = both[:b] + both[b:]
    return gate(logits.astype(dtype))


def cbam_spatial_pool(x: jax.Array, light: bool = False) -> jax.Array:
    """The input of CBAM's spatial convolution: [mean; max] over the channels.

    Args:
      x: `[B, H, W, C]`.
      light: timm's `LightSpatialAttn`: one channel, `0.5 * mean + 0.5 * max`.

    Returns:
      `[B, H, W, 2]` (mean first), or `[B, H, W, 1]` when `light`; in x's dtype, the mean
      accumulated in float32.
    """
    x = as_float(x)
    check_image("x", x)
    avg = jnp.mean(x, axis=-1, keepdims=True, dtype=_stats_dtype(x)).astype(x.dtype)
    peak = channel_max(x)[..., None]
    if light:
        return 0.5 * avg + 0.5 * peak
    return jnp.concatenate([avg, peak], axis=-1)


def spatial_excite(x: jax.Array, gates: jax.Array) -> jax.Array:
    """Scales every position of every sample: `x * gates` broadcast over the channels.

    Args:
      x: `[B, H, W, C]`.
      gates: `[B, H, W]`.

    Returns:
      `[B, H, W, C]` in x's dtype.
    """
    x, gates = map(as_float, (x, gates))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("gates", gates, 3, "[B, H, W]")
    check_same(("x", "gates"), (x.shape[:3], gates.shape), "batch and spatial dimensions",
               (x.shape, gates.shape))
    return x * gates.astype(x.dtype)[..., None]


def cbam(x: jax.Array, mlp: ArrayFn, spatial_conv: ArrayFn, gate: ArrayFn = jax.nn.sigmoid,
         light: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CBAM: channel attention, then spatial attention on the channel-gated input.

    `y = x * cbam_channel_gates(x)`, `out = y * gate(spatial_conv(cbam_spatial_pool(y)))`.

    Args:
      x: `[B, H, W, C]`.
      mlp: `[N, C]` -> `[N, C]`, the shared MLP of the channel attention.
      spatial_conv: `[B, H, W, 2]` (`[B, H, W, 1]` when `light`) -> `[B, H, W, 1]`, timm's
        7x7 conv + BatchNorm.
      gate: the gate of both attentions (timm's `LightCbamModule` uses sigmoids: pass the
        default).
      light: timm's light variant (see `cbam_channel_gates`, `cbam_spatial_pool`).

    Returns:
      `out` `[B, H, W, C]` in x's dtype, the channel gates `[B, C]` and the spatial gates
      `[B, H, W]` (both float32, float64 for float64 inputs).
    """
    x = as_float(x)
    gates_c = cbam_channel_gates(x, mlp, gate, light)
    y = excite(x, gates_c.astype(x.dtype))
    logits = spatial_conv(cbam_spatial_pool(y, light))
    check_rank("spatial_conv output", logits, 4, "[B, H, W, 1]")
    gates_s = gate(logits[..., 0].astype(gates_c.dtype))
    return spatial_excite(y, gates_s), gates_c, gates_s
