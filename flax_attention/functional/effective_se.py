"""Pure functions: Effective Squeeze-Excitation (Lee, Park: "CenterMask: Real-Time Anchor-Free
Instance Segmentation", CVPR 2020), in the form of timm's `timm/layers/squeeze_excite.py`
(`EffectiveSEModule`), and the squeeze and the gates that timm's channel attentions share.

Axis legend: B batch, H height, W width, C channels. The squeeze and the gates run in float32
(float64 for float64 inputs) whatever the input dtype: they cost `O(B C^2)` at most, nothing
next to `x`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_image, check_rank, check_same
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.squeeze_excitation import excite, spatial_max, spatial_mean

__all__ = [
    "channel_squeeze",
    "effective_se",
    "effective_se_gates",
]

def stat_dtype(x: jax.Array) -> jnp.dtype:
    """The dtype of statistics of `x`: float32, or float64 for float64 inputs."""
    return jnp.promote_types(x.dtype, jnp.float32)


def channel_squeeze(x: jax.Array, add_maxpool: bool = False) -> jax.Array:
    """The global squeeze: the spatial mean of every channel, in float32.

    Args:
      x: `[B, H, W, C]`.
      add_maxpool: average the mean with the spatial maximum (`0.5 mean + 0.5 max`, timm's
        experimental `add_maxpool`).

    Returns:
      `[B, C]` in float32 (float64 for float64 inputs).

    Raises:
      ValueError: x not `[B, H, W, C]`, or a zero-size dimension (no positions to pool).
    """
    x = as_float(x)
    check_image("x", x)
    dtype = stat_dtype(x)
    squeezed = spatial_mean(x, dtype)
    if add_maxpool:
        squeezed = 0.5 * squeezed + 0.5 * spatial_max(x).astype(dtype)
    return squeezed


def effective_se_gates(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    add_maxpool: bool = False,
    gate: Activation = "hard_sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The eSE gates: `gate(squeeze(x) @ kernel + bias)`, one fully connected C -> C layer.

    Args:
      x: `[B, H, W, C]`.
      kernel: `[C, C]` (inputs, outputs), timm's `fc.weight[:, :, 0, 0]` transposed.
      bias: `[C]`, timm's `fc.bias`.
      add_maxpool: squeeze with `0.5 mean + 0.5 max`.
      gate: the gate non-linearity, `"hard_sigmoid"` (`relu6(z + 3) / 6`) by default.
      precision: of the matrix product.

    Returns:
      `[B, C]` gates in float32 (float64 for float64 inputs).
    """
    x, kernel, bias = map(as_float, (x, kernel, bias))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("kernel", kernel, 2, "[C, C]")
    check_rank("bias", bias, 1, "[C]")
    channels = x.shape[-1]
    check_same(("x", "kernel", "kernel", "bias"),
               (channels, *kernel.shape, bias.shape[0]), "channels",
               (x.shape, kernel.shape, kernel.shape, bias.shape))
    gate_fn = activation_function(gate, "gate")
    squeezed = channel_squeeze(x, add_maxpool)
    dtype = squeezed.dtype
    logits = jnp.dot(squeezed, kernel.astype(dtype), precision=precision) + bias.astype(dtype)
    return gate_fn(logits)


def effective_se(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    add_maxpool: bool = False,
    gate: Activation = "hard_sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Effective squeeze-excitation: `x` with every channel scaled by its eSE gate.

    Args:
      x: `[B, H, W, C]`.
      kernel, bias, add_maxpool, gate, precision: as in `effective_se_gates`.

    Returns:
      `[B, H, W, C]` in x's dtype.
    """
    x, kernel, bias = map(as_float, (x, kernel, bias))
    gates = effective_se_gates(x, kernel, bias, add_maxpool=add_maxpool, gate=gate,
                               precision=precision)
    return excite(x, gates.astype(x.dtype))
