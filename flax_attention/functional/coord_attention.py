"""Pure functions: coordinate attention (Hou, Zhou, Feng: "Coordinate Attention for Efficient
Mobile Network Design", CVPR 2021).

Axis legend: B batch, H height, W width, C channels. The input is pooled along each spatial axis
into two strips, a shared 1x1 conv with BatchNorm encodes them (in the module, which owns the
BatchNorm's state), and two 1x1 convs give a gate per row `a_h [B, H, C]` and per column
`a_w [B, W, C]`; the output is `x * a_w * a_h`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_image, check_nonempty, check_rank, check_same

__all__ = ["coordinate_attention_map", "coordinate_excite", "coordinate_pool"]


def coordinate_pool(x: jax.Array) -> jax.Array:
    """The two strip poolings, concatenated as the reference's `cat([x_h, x_w])`.

    The means accumulate in float32 (float64 for float64 input) whatever x's dtype.

    Args:
      x: `[B, H, W, C]`.

    Returns:
      `[B, H + W, C]` in x's dtype: rows `0..H-1` hold the mean over W of every row, rows
      `H..H+W-1` the mean over H of every column.
    """
    x = as_float(x)
    check_image("x", x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    rows = jnp.mean(x, axis=2, dtype=dtype)
    cols = jnp.mean(x, axis=1, dtype=dtype)
    return jnp.concatenate([rows, cols], axis=1).astype(x.dtype)


def _check_gates(x_shape: tuple[int, ...] | None, gate_h: jax.Array, gate_w: jax.Array) -> None:
    check_rank("gate_h", gate_h, 3, "[B, H, C]")
    check_rank("gate_w", gate_w, 3, "[B, W, C]")
    check_same(("gate_h", "gate_w"), ((gate_h.shape[0], gate_h.shape[2]),
                                      (gate_w.shape[0], gate_w.shape[2])),
               "batch and channels", (gate_h.shape, gate_w.shape))
    if x_shape is not None:
        gates = (gate_h.shape[0], gate_h.shape[1], gate_w.shape[1], gate_h.shape[2])
        check_same(("x", "gates"), (tuple(x_shape), gates), "shape [B, H, W, C]",
                   (x_shape, gates))


def coordinate_excite(x: jax.Array, gate_h: jax.Array, gate_w: jax.Array) -> jax.Array:
    """`x * a_w * a_h`: every element scaled by the gate of its row and of its column.

    Args:
      x: `[B, H, W, C]`.
      gate_h: `[B, H, C]`, the gate of every row and channel.
      gate_w: `[B, W, C]`, the gate of every column and channel.

    Returns:
      `[B, H, W, C]`, in the promoted dtype of the three.
    """
    x, gate_h, gate_w = map(as_float, (x, gate_h, gate_w))
    check_rank("x", x, 4, "[B, H, W, C]")
    _check_gates(x.shape, gate_h, gate_w)
    return x * gate_w[:, None, :, :] * gate_h[:, :, None, :]


def coordinate_attention_map(gate_h: jax.Array, gate_w: jax.Array,
                             precision: lax.PrecisionLike = None) -> jax.Array:
    """The spatial attention map: the mean over channels of `a_h * a_w`, in float32.

    Args:
      gate_h: `[B, H, C]`.
      gate_w: `[B, W, C]`.
      precision: of the contraction over C.

    Returns:
      `[B, H, W]` float32 (float64 for float64 input).
    """
    gate_h, gate_w = map(as_float, (gate_h, gate_w))
    _check_gates(None, gate_h, gate_w)
    check_nonempty("gate_h", gate_h, "[B, H, C]")
    check_nonempty("gate_w", gate_w, "[B, W, C]")
    dtype = jnp.promote_types(jnp.result_type(gate_h, gate_w), jnp.float32)
    products = jnp.einsum("bhc,bwc->bhw", gate_h.astype(dtype), gate_w.astype(dtype),
                          precision=precision)
    return products / gate_h.shape[-1]
