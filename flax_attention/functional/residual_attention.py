"""Pure functions of the Residual Attention Network (Wang et al., "Residual Attention Network
for Image Classification", CVPR 2017): the top-down upsampling of the soft mask branch and the
attention residual that combines the mask with the trunk.

Shapes use the legend B batch, H height, W width, C channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention._checks import as_float, check_nonempty, check_rank

__all__ = ["attention_residual", "interpolate_bilinear"]

_LAYOUT = "[B, H, W, C]"
Precision = jax.lax.PrecisionLike


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """`[n_out, n_in]` weights of 1-D linear interpolation with aligned corners."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    weights.flags.writeable = False
    return weights


def interpolate_bilinear(x: jax.Array, size: tuple[int, int],
                         precision: Precision = None) -> jax.Array:
    """Bilinear resize with aligned corners, as torch's `UpsamplingBilinear2d`.

    The corner pixel centres of input and output coincide (`align_corners=True`), so output
    pixel i samples input position `i * (H - 1) / (H' - 1)`. Computed as two small
    interpolation-matrix products (rows, then columns); gradients flow to `x`.

    Args:
      x: `[B, H, W, C]`.
      size: `(H', W')`, the output's spatial size (positive).
      precision: of the matrix products.

    Returns:
      `[B, H', W', C]` in the dtype of `x`.
    """
    x = as_float(x)
    check_rank("x", x, 4, _LAYOUT)
    check_nonempty("x", x, _LAYOUT)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be two positive ints (H', W'), got {tuple(size)}")
    rows = jnp.asarray(_interpolation_matrix(size[0], x.shape[1]), x.dtype)
    cols = jnp.asarray(_interpolation_matrix(size[1], x.shape[2]), x.dtype)
    x = jnp.einsum("ph,bhwc->bpwc", rows, x, precision=precision)
    return jnp.einsum("qw,bpwc->bpqc", cols, x, precision=precision)


def attention_residual(trunk: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention residual learning: `(1 + mask) * trunk`.

    Args:
      trunk: `[B, H, W, C]`, the trunk branch's features T.
      mask: `[B, H, W, C]`, the soft mask M in [0, 1].

    Returns:
      `[B, H, W, C]`: T where the mask is 0, up to 2 T where it is 1.
    """
    trunk, mask = as_float(trunk), as_float(mask)
    check_rank("trunk", trunk, 4, _LAYOUT)
    if mask.shape != trunk.shape:
        raise ValueError(
            f"mask must have the shape of trunk {tuple(trunk.shape)}, got {tuple(mask.shape)}"
        )
    return (1 + mask) * trunk
