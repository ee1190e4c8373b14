"""Pure functions: efficient channel attention (Wang, Wu, Zhu, Li, Zuo, Hu: "ECA-Net: Efficient
Channel Attention for Deep Convolutional Neural Networks", CVPR 2020), in the form of timm's
`timm/layers/eca.py` (`EcaModule`, and `CecaModule`, whose 1-D convolution pads circularly).

Axis legend: B batch, H height, W width, C channels, K kernel size, I/O input/output features
of the 1-D convolution that slides along the channel axis, R its hidden features (timm's
experimental MLP variant). The gates run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import as_float, check_rank, check_same
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.effective_se import channel_squeeze
from flax_attention.functional.squeeze_excitation import excite

__all__ = [
    "channel_conv",
    "eca",
    "eca_gates",
    "eca_kernel_size",
    "eca_mlp_gates",
]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: `t = int(|log2(C) + beta| / gamma)`, made odd (t + 1 if t is
    even), at least 3 (timm's rule; 3 for C < 128, 5 for C < 2048, 7 below 2^15)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


def _check_odd(name: str, size: int) -> None:
    if size % 2 != 1:
        raise ValueError(f"{name} must be odd (the 1-D convolution keeps C), got {size}")


def channel_conv(
    y: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    circular: bool = False,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """A 1-D convolution (torch's cross-correlation) along the channel axis that keeps its
    length: padding `(K - 1) / 2` zeros (ECA) or wrapped channels (CECA) on each side.

    Args:
      y: `[B, C, I]`.
      kernel: `[K, I, O]`, K odd (torch `Conv1d.weight` `[O, I, K]` transposed).
      bias: `[O]` or None.
      circular: pad circularly instead of with zeros.
      precision: of the convolution.

    Returns:
      `[B, C, O]` in y's dtype.
    """
    y, kernel, bias = map(as_float, (y, kernel, bias))
    check_rank("y", y, 3, "[B, C, I]")
    check_rank("kernel", kernel, 3, "[K, I, O]")
    check_same(("y", "kernel"), (y.shape[-1], kernel.shape[1]), "input features (y[-1], "
               "kernel[1])", (y.shape, kernel.shape))
    _check_odd("kernel size (kernel[0])", kernel.shape[0])
    pad = (kernel.shape[0] - 1) // 2
    padding = [(pad, pad)]
    if circular:
        y, padding = jnp.pad(y, ((0, 0), (pad, pad), (0, 0)), mode="wrap"), [(0, 0)]
    out = lax.conv_general_dilated(y, kernel.astype(y.dtype), (1,), padding,
                                   dimension_numbers=("NWC", "WIO", "NWC"), precision=precision)
    return out if bias is None else out + bias.astype(y.dtype)


def eca_gates(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    circular: bool = False,
    gate: Activation = "sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The ECA gates: `gate(conv1d(mean(x)))`, one K-tap filter sliding along the channels.

    Args:
      x: `[B, H, W, C]`.
      kernel: `[K]`, K odd (timm's `conv.weight[0, 0]`).
      bias: `[1]` or `[]`, or None (timm's ECA has none; CECA has one when given `act_layer`).
      circular: CECA's circular padding instead of ECA's zeros.
      gate: the gate non-linearity, sigmoid by default.
      precision: of the convolution.

    Returns:
      `[B, C]` gates in float32 (float64 for float64 inputs).
    """
    x, kernel, bias = map(as_float, (x, kernel, bias))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("kernel", kernel, 1, "[K]")
    gate_fn = activation_function(gate, "gate")
    squeezed = channel_squeeze(x)
    logits = channel_conv(squeezed[..., None], kernel[:, None, None].astype(squeezed.dtype),
                          None if bias is None else jnp.reshape(bias, (1,)),
                          circular=circular, precision=precision)
    return gate_fn(logits[..., 0])


def eca_mlp_gates(
    x: jax.Array,
    kernel1: jax.Array,
    bias1: jax.Array,
    kernel2: jax.Array,
    bias2: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    gate: Activation = "sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The gates of timm's experimental ECA "mlp" mode (`create_attn` name "ecam"): a 1x1
    convolution 1 -> R along the channels, `act`, a K-tap convolution R -> 1, the gate.

    Args:
      x: `[B, H, W, C]`.
      kernel1: `[R]`, bias1: `[R]` (timm's `conv`).
      kernel2: `[K, R]`, K odd, bias2: `[1]` (timm's `conv2`).
      act: the hidden non-linearity (ReLU).
      gate: the gate non-linearity.
      precision: of both convolutions.

    Returns:
      `[B, C]` gates in float32 (float64 for float64 inputs).
    """
    x, kernel1, bias1, kernel2, bias2 = map(as_float, (x, kernel1, bias1, kernel2, bias2))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("kernel1", kernel1, 1, "[R]")
    check_rank("kernel2", kernel2, 2, "[K, R]")
    gate_fn = activation_function(gate, "gate")
    squeezed = channel_squeeze(x)
    dtype = squeezed.dtype
    hidden = act(channel_conv(squeezed[..., None], kernel1[None, None].astype(dtype), bias1,
                              precision=precision))
    logits = channel_conv(hidden, kernel2[..., None].astype(dtype), bias2, precision=precision)
    return gate_fn(logits[..., 0])


def eca(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    circular: bool = False,
    gate: Activation = "sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Efficient channel attention: `x` with every channel scaled by its ECA gate.

    Args:
      x: `[B, H, W, C]`.
      kernel, bias, circular, gate, precision: as in `eca_gates`.

    Returns:
      `[B, H, W, C]` in x's dtype.
    """
    x, kernel, bias = map(as_float, (x, kernel, bias))
    gates = eca_gates(x, kernel, bias, circular=circular, gate=gate, precision=precision)
    return excite(x, gates.astype(x.dtype))
