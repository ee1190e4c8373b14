"""Pure functions: gather-excite (Hu, Shen, Albanie, Sun, Vedaldi: "Gather-Excite: Exploiting
Feature Context in Convolutional Neural Networks", NeurIPS 2018), in the form of timm's
`timm/layers/gather_excite.py` (`GatherExcite`).

Axis legend: B batch, H height, W width, C channels, R hidden units of the MLP, and h, w the
gathered sizes: `ceil(H / extent)`, `ceil(W / extent)` (1, 1 for the global extent 0). The
parameter-free gather, the MLP and the gate run in float32 (float64 for float64 inputs). The
parametric gather (depthwise convolutions with BatchNorm) owns parameters and state, so it
lives in the module (`flax_attention.gather_excite`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_attention._checks import as_float, check_image, check_rank, check_same
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.effective_se import channel_squeeze, stat_dtype

__all__ = [
    "check_extent",
    "conv_mlp",
    "depthwise_conv3x3_stride2",
    "excite_spatial",
    "gather",
    "gather_excite",
    "gather_excite_gates",
    "nearest_indices",
]


def check_extent(extent: int) -> None:
    """Raises ValueError unless `extent` is 0 (global) or even and positive (timm's rule)."""
    if extent < 0 or extent % 2:
        raise ValueError(f"extent must be 0 (global) or even and positive, got {extent}")


def _pool_matrix(size: int, extent: int) -> np.ndarray:
    """`[n, size]`: row i averages the unpadded positions of window i of a 1-D average pooling
    of window `2 extent - 1`, stride `extent`, padding `extent - 1` (`count_include_pad=False`)."""
    kernel, pad = 2 * extent - 1, extent - 1
    starts = np.arange((size + 2 * pad - kernel) // extent + 1) * extent - pad
    positions = np.arange(size)
    inside = (positions >= starts[:, None]) & (positions < starts[:, None] + kernel)
    return inside / inside.sum(axis=1, keepdims=True)


def gather(x: jax.Array, extent: int = 0, add_maxpool: bool = False) -> jax.Array:
    """The parameter-free gather: the mean of every channel over windows of side `2 extent - 1`
    every `extent` positions (torch's `avg_pool2d` with padding `extent - 1`,
    `count_include_pad=False`), or over the whole image for `extent = 0`.

    Args:
      x: `[B, H, W, C]`.
      extent: 0 (global) or even.
      add_maxpool: average with the maximum over the same windows (`0.5 mean + 0.5 max`).

    Returns:
      `[B, h, w, C]` in float32 (float64 for float64 inputs); `[B, 1, 1, C]` for extent 0.
    """
    x = as_float(x)
    check_image("x", x)
    check_extent(extent)
    if extent == 0:
        return channel_squeeze(x, add_maxpool)[:, None, None]
    # The pooling is separable: two small matrix products (exact ones, highest precision),
    # whose gradients are matrix products too, unlike those of a strided reduce_window.
    dtype = stat_dtype(x)
    rows, cols = (jnp.asarray(_pool_matrix(n, extent), dtype) for n in x.shape[1:3])
    highest = lax.Precision.HIGHEST
    gathered = jnp.einsum("hH,bHWc->bhWc", rows, x.astype(dtype), precision=highest)
    gathered = jnp.einsum("wW,bhWc->bhwc", cols, gathered, precision=highest)
    if add_maxpool:
        # numpy init value: concrete under jit, so JAX sees a (differentiable) max pooling
        kernel, pad = 2 * extent - 1, extent - 1
        maxes = lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, kernel, kernel, 1),
                                  (1, extent, extent, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        gathered = 0.5 * gathered + 0.5 * maxes.astype(dtype)
    return gathered


def conv_mlp(
    y: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    w2: jax.Array,
    b2: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """timm's `ConvMlp` (two 1x1 convolutions with bias around `act`) over the channels of
    every position, in y's dtype.

    Args:
      y: `[B, h, w, C]`.
      w1: `[C, R]`, b1: `[R]` (timm's `mlp.fc1`); w2: `[R, C]`, b2: `[C]` (`mlp.fc2`).
      act: the hidden non-linearity.
      precision: of both matrix products.

    Returns:
      `[B, h, w, C]`.
    """
    y, w1, b1, w2, b2 = map(as_float, (y, w1, b1, w2, b2))
    check_rank("w1", w1, 2, "[C, R]")
    check_rank("w2", w2, 2, "[R, C]")
    check_same(("y", "w1"), (y.shape[-1], w1.shape[0]), "channels (y[-1], w1[0])",
               (y.shape, w1.shape))
    check_same(("w1", "w2"), (w1.shape[1], w2.shape[0]), "hidden units (w1[1], w2[0])",
               (w1.shape, w2.shape))
    check_same(("y", "w2"), (y.shape[-1], w2.shape[1]), "channels (y[-1], w2[1])",
               (y.shape, w2.shape))
    dtype = y.dtype
    hidden = act(jnp.dot(y, w1.astype(dtype), precision=precision) + b1.astype(dtype))
    return jnp.dot(hidden, w2.astype(dtype), precision=precision) + b2.astype(dtype)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """The source index of every output position of torch's default (legacy "nearest")
    interpolation: `min(floor(i * float32(in / out)), in - 1)`, in float32 as torch computes it
    (exact `i // 2` when the size doubles)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def depthwise_conv3x3_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A depthwise 3x3 convolution of stride 2 and padding 1, without bias (timm's extent > 0
    gather convolutions), as the sum of nine strided slices times per-channel weights,
    accumulated in float32: on the CPU its gradient is far cheaper than that of a grouped
    convolution.

    Args:
      x: `[B, H, W, C]`.
      kernel: `[3, 3, 1, C]` (`nn.Conv`'s layout with `feature_group_count=C`).

    Returns:
      `[B, ceil(H / 2), ceil(W / 2), C]` in x's dtype.
    """
    x, kernel = map(as_float, (x, kernel))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("kernel", kernel, 4, "[3, 3, 1, C]")
    check_same(("x", "kernel"), ((x.shape[-1], 3, 3, 1), (kernel.shape[-1], *kernel.shape[:3])),
               "channels and kernel size", (x.shape, kernel.shape))
    dtype = stat_dtype(x)
    h, w = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2
    padded = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = kernel.astype(dtype)
    out = sum(padded[:, i:i + 2 * h - 1:2, j:j + 2 * w - 1:2] * kernel[i, j, 0]
              for i in range(3) for j in range(3))
    return out.astype(x.dtype)


def excite_spatial(x: jax.Array, gates: jax.Array) -> jax.Array:
    """`x` times its gates, resized to x's size by torch's nearest interpolation.

    Args:
      x: `[B, H, W, C]`.
      gates: `[B, h, w, C]`; `[B, 1, 1, C]` broadcasts.

    Returns:
      `[B, H, W, C]` in x's dtype.
    """
    x, gates = map(as_float, (x, gates))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("gates", gates, 4, "[B, h, w, C]")
    check_same(("x", "gates"), ((x.shape[0], x.shape[-1]), (gates.shape[0], gates.shape[-1])),
               "batch and channels", (x.shape, gates.shape))
    gates = gates.astype(x.dtype)
    if gates.shape[1:3] == (1, 1):
        return x * gates
    (b, h, w, c), (height, width) = gates.shape, x.shape[1:3]
    rows, cols = nearest_indices(h, height), nearest_indices(w, width)
    if height % h == 0 and width % w == 0 and (
            (rows == np.arange(height) // (height // h)).all()
            and (cols == np.arange(width) // (width // w)).all()):
        # Every gate covers a (height / h) x (width / w) block: a broadcast, fused with the product.
        blocks = x.reshape(b, h, height // h, w, width // w, c)
        return (blocks * gates[:, :, None, :, None]).reshape(x.shape)
    # Otherwise one-hot matrix products (exact at highest precision); unlike a gather, their
    # gradient is a matrix product, not a scatter.
    highest = lax.Precision.HIGHEST
    one_hot_rows = jnp.asarray(rows[:, None] == np.arange(h), x.dtype)
    one_hot_cols = jnp.asarray(cols[:, None] == np.arange(w), x.dtype)
    gates = jnp.einsum("Hh,bhwc->bHwc", one_hot_rows, gates, precision=highest)
    return x * jnp.einsum("Ww,bHwc->bHWc", one_hot_cols, gates, precision=highest)


def gather_excite_gates(
    x: jax.Array,
    w1: jax.Array | None = None,
    b1: jax.Array | None = None,
    w2: jax.Array | None = None,
    b2: jax.Array | None = None,
    *,
    extent: int = 0,
    add_maxpool: bool = False,
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    gate: Activation = "sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """The gates of the parameter-free gather: `gate(conv_mlp(gather(x)))`.

    Args:
      x: `[B, H, W, C]`.
      w1, b1, w2, b2: the MLP as in `conv_mlp`, or all None for none (timm's `use_mlp=False`).
      extent, add_maxpool: of `gather`.
      act: the MLP's hidden non-linearity.
      gate: the gate non-linearity.
      precision: of the MLP's matrix products.

    Returns:
      `[B, h, w, C]` gates in float32 (float64 for float64 inputs).
    """
    x, w1, b1, w2, b2 = map(as_float, (x, w1, b1, w2, b2))
    gate_fn = activation_function(gate, "gate")
    gathered = gather(x, extent, add_maxpool)
    if w1 is None:
        return gate_fn(gathered)
    return gate_fn(conv_mlp(gathered, w1, b1, w2, b2, act=act, precision=precision))


def gather_excite(
    x: jax.Array,
    w1: jax.Array | None = None,
    b1: jax.Array | None = None,
    w2: jax.Array | None = None,
    b2: jax.Array | None = None,
    *,
    extent: int = 0,
    add_maxpool: bool = False,
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    gate: Activation = "sigmoid",
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """Gather-excite with the parameter-free gather: `x` times its nearest-resized gates.

    With `extent = 0` and the MLP it is squeeze-and-excitation with biases.

    Args:
      x: `[B, H, W, C]`.
      w1, b1, w2, b2, extent, add_maxpool, act, gate, precision: as in `gather_excite_gates`.

    Returns:
      `[B, H, W, C]` in x's dtype.
    """
    x, w1, b1, w2, b2 = map(as_float, (x, w1, b1, w2, b2))
    gates = gather_excite_gates(x, w1, b1, w2, b2, extent=extent, add_maxpool=add_maxpool,
                                act=act, gate=gate, precision=precision)
    return excite_spatial(x, gates)
