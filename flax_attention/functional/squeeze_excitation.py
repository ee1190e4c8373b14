"""Pure functions: squeeze-and-excitation channel gating (Hu et al., CVPR 2018).

Axis legend: B batch, H height, W width, C channels, R = C / reduction hidden units; `*S` stands
for any number (at least one) of spatial axes, so the ops work for `[B, L, C]`, `[B, H, W, C]`
and `[B, T, H, W, C]` alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_nonempty, check_rank, check_same
from flax_attention.functional.activations import Activation, activation_function

__all__ = ["channel_max", "excite", "spatial_max", "spatial_mean", "squeeze_excitation",
           "squeeze_excitation_gates"]

# Positions whose channel rows `spatial_mean` sums side by side in its first pass. XLA:CPU's
# reduction over the spatial axes keeps one accumulator row of C channels; rows of 8 C ran the
# mean of x [32, 56, 56, 256] in 3.2 ms instead of 5.1 (2 positions 4.1, 4: 3.4, 16: 3.3; torch's
# NCHW mean 2.6 ms) on a 2-core CPU, the values equal to float32 rounding (1e-8).
_SIDE_BY_SIDE = 8


def check_spatial_input(name: str, x: jax.Array) -> None:
    """Raises ValueError unless `x` is `[B, *S, C]` with at least one spatial axis."""
    if x.ndim < 3:
        raise ValueError(
            f"{name} must have rank >= 3 ([B, *S, C], at least one spatial axis), "
            f"got shape {tuple(x.shape)} (rank {x.ndim})"
        )


def _side_by_side(x: jax.Array) -> tuple[jax.Array, int]:
    """`x` `[B, *S, C]` as rows of k positions' channels side by side, `[B, S / k, k C]`, and k
    (`_SIDE_BY_SIDE`, or the largest divisor of the number of positions below it)."""
    positions = math.prod(x.shape[1:-1])
    k = max(n for n in range(1, _SIDE_BY_SIDE + 1) if positions % n == 0)
    return x.reshape(x.shape[0], positions // k, k * x.shape[-1]), k


def spatial_mean(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The mean of every channel over the spatial axes, accumulated in `dtype`.

    Summed in two passes, the first over rows of several positions' channels side by side
    (`_SIDE_BY_SIDE`, the largest divisor of the number of positions up to it), which XLA:CPU
    reduces faster than one row of C.

    Args:
      x: `[B, *S, C]`.
      dtype: of the sums and the result.

    Returns:
      `[B, C]` in `dtype`.
    """
    rows, k = _side_by_side(x)
    sums = rows.sum(1, dtype=dtype).reshape(x.shape[0], k, x.shape[-1]).sum(1)
    return sums / (rows.shape[1] * k)


def _with_even_ties(axes: Callable[[jax.Array], tuple[int, ...]]):
    """Gives a maximum over `axes(x)` `jnp.max`'s derivative, which splits evenly between the
    entries that tie for the maximum, as torch's `amax` does.

    The ties are counted in int32: counted in x's dtype, XLA:CPU fused the mask with the backward
    pass's select into one more x-sized buffer (eSE with add_maxpool, forward+backward at
    [32, 56, 56, 256]: 90-94 ms, against 75-79 ms counted in int32)."""

    def decorate(max_fn: Callable[[jax.Array], jax.Array]):
        fn = jax.custom_jvp(max_fn)

        @fn.defjvp
        def jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]):
            (x,), (dx,) = primals, tangents
            top, over = fn(x), axes(x)
            hit = x == jnp.expand_dims(top, over)
            ties = hit.sum(over, dtype=jnp.int32).astype(top.dtype)
            return top, jnp.where(hit, dx, 0).sum(over) / ties

        return fn

    return decorate


@_with_even_ties(lambda x: tuple(range(1, x.ndim - 1)))
def spatial_max(x: jax.Array) -> jax.Array:
    """The maximum of every channel over the spatial axes, `[B, *S, C]` -> `[B, C]`.

    Taken in two passes as `spatial_mean` is (x `[32, 56, 56, 256]` on a 2-core CPU: 2.5 ms
    against 4.1 for `jnp.max` over the spatial axes). The derivative is `jnp.max`'s and that of
    torch's `amax`, split evenly between the positions that tie for the maximum (the two
    passes' own would split between rows first).
    """
    rows, k = _side_by_side(x)
    return rows.max(1).reshape(x.shape[0], k, x.shape[-1]).max(1)


@_with_even_ties(lambda x: (x.ndim - 1,))
def channel_max(x: jax.Array) -> jax.Array:
    """The maximum over the channels of every position, `[B, *S, C]` -> `[B, *S]`, with
    `jnp.max`'s derivative (ties split evenly, as torch's `amax`)."""
    return x.max(-1)


def _check_gate_inputs(x: jax.Array, w1: jax.Array, w2: jax.Array) -> None:
    check_spatial_input("x", x)
    check_nonempty("x", x, "[B, *S, C]")
    check_rank("w1", w1, 2, "[C, R]")
    check_rank("w2", w2, 2, "[R, C]")
    check_same(("x", "w1"), (x.shape[-1], w1.shape[0]), "channels (x[-1], w1[0])",
               (x.shape, w1.shape))
    check_same(("w1", "w2"), (w1.shape[1], w2.shape[0]), "hidden units (w1[1], w2[0])",
               (w1.shape, w2.shape))
    check_same(("x", "w2"), (x.shape[-1], w2.shape[1]), "channels (x[-1], w2[1])",
               (x.shape, w2.shape))


def squeeze_excitation_gates(
    x: jax.Array, w1: jax.Array, w2: jax.Array, precision: lax.PrecisionLike = None,
    b1: jax.Array | None = None, b2: jax.Array | None = None, *, add_maxpool: bool = False,
    act: Activation = "relu", gate: Activation = "sigmoid",
) -> jax.Array:
    """The excitation gates: `sigmoid(relu(mean(x) @ w1 + b1) @ w2 + b2)`.

    The squeeze (global average over every spatial axis) and both bias-free fully connected
    layers run in float32 (float64 for float64 inputs) whatever the input dtype; they cost
    `O(B C R)`, nothing next to `x`.

    Args:
      x: `[B, *S, C]`.
      w1: `[C, R]`, the reduction layer (torch `fc.0.weight` transposed).
      w2: `[R, C]`, the expansion layer (torch `fc.2.weight` transposed).
      precision: of both matrix products.
      b1, b2: `[R]`, `[C]` biases of the two layers (timm's `SEModule`); None for none.
      add_maxpool: squeeze with `(mean + max) / 2` over space (timm's `add_maxpool`).
      act, gate: the hidden activation and the gate, timm's names
        (`functional.activations.ACTIVATIONS`) or functions.

    Returns:
      `[B, C]` gates in (0, 1), in x's dtype (float32 for an integer or boolean x).

    Raises:
      ValueError: bad ranks, mismatched channels or hidden units, or a zero-size `x`.
    """
    x, w1, w2, b1, b2 = map(as_float, (x, w1, w2, b1, b2))
    _check_gate_inputs(x, w1, w2)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    act, gate = activation_function(act, "act"), activation_function(gate, "gate")
    squeezed = spatial_mean(x, dtype)
    if add_maxpool:
        squeezed = 0.5 * squeezed + 0.5 * spatial_max(x).astype(dtype)
    hidden = jnp.dot(squeezed, w1.astype(dtype), precision=precision)
    hidden = act(hidden if b1 is None else hidden + b1.astype(dtype))
    logits = jnp.dot(hidden, w2.astype(dtype), precision=precision)
    gates = gate(logits if b2 is None else logits + b2.astype(dtype))
    return gates.astype(x.dtype)


def excite(x: jax.Array, gates: jax.Array) -> jax.Array:
    """Scales every channel of every sample: `x * gates` broadcast over the spatial axes.

    Args:
      x: `[B, *S, C]`.
      gates: `[B, C]`.

    Returns:
      `[B, *S, C]`.
    """
    x, gates = as_float(x), as_float(gates)
    check_spatial_input("x", x)
    check_rank("gates", gates, 2, "[B, C]")
    check_same(("x", "gates"), ((x.shape[0], x.shape[-1]), gates.shape),
               "batch and channels", (x.shape, gates.shape))
    return x * gates.reshape(gates.shape[0], *(1,) * (x.ndim - 2), gates.shape[1])


def squeeze_excitation(
    x: jax.Array, w1: jax.Array, w2: jax.Array, precision: lax.PrecisionLike = None
) -> jax.Array:
    """Squeeze-and-excitation: `x` with every channel scaled by its gate.

    Args:
      x: `[B, *S, C]`.
      w1: `[C, R]`, the reduction layer.
      w2: `[R, C]`, the expansion layer.
      precision: of the gates' matrix products.

    Returns:
      `[B, *S, C]`, `x * squeeze_excitation_gates(x, w1, w2)`.
    """
    x = as_float(x)
    return excite(x, squeeze_excitation_gates(x, w1, w2, precision))
