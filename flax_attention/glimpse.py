"""The glimpse sensor (retina) of the Recurrent Attention Model.

Mnih, Heess, Graves, Kavukcuoglu: "Recurrent Models of Visual Attention", NeurIPS 2014; the
reference is kevinzakka/recurrent-visual-attention (`Retina.foveate`). The retina extracts
`num_scales` square patches centred on a location, of sides g, s g, s^2 g... (s the scale
factor, 2 in the paper), and resizes each to g x g: a bandwidth-limited, multi-resolution view.

Written with the gather-based sampler of the spatial transformer, so it is jit/vmap friendly and
differentiable w.r.t. the image and the location: the patch of side `g s^i` is an axis-aligned
affine grid of `g s^i` pixel centres (`affine_grid`, align_corners=False) sampled bilinearly
with zero padding (`bilinear_sample`), then average-pooled by `s^i` to g x g, exactly as the
reference's crop + `avg_pool2d` when the patch is pixel-aligned (between pixels the crop is the
bilinear interpolation of the image; the reference rounds the location to whole pixels).

Locations are (x, y) in [-1, 1]^2, torch's grid order: x indexes the width, y the height;
(-1, -1) is the top-left corner of the image (the outer pixel edges, as align_corners=False),
(0, 0) its centre. The rule for sizes: the finest patch (side g) must fit in the image
(g <= min(H, W)); the coarser ones may extend beyond it and read zeros there, as may every patch
near the border.

Axis legend: B batch, H height, W width, C channels; k scales, g the patch side.
"""

from __future__ import annotations

import operator

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention._checks import check_same
from flax_attention.functional import spatial

__all__ = ["GlimpseSensor", "check_retina_args", "glimpse_extents", "retina"]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_retina_args(image_shape: tuple[int, ...], location_shape: tuple[int, ...],
                      patch_size: int, num_scales: int, scale: int) -> None:
    """Raises ValueError for a bad retina call (see `retina`), before any computation."""
    _positive_int("num_scales", num_scales)
    _positive_int("scale", scale)
    g = _positive_int("patch_size", patch_size)
    if len(image_shape) != 4:
        raise ValueError(f"images must have rank 4 ([B, H, W, C]), got shape {tuple(image_shape)}")
    if len(location_shape) != 2 or location_shape[1] != 2:
        raise ValueError(f"locations must have shape [B, 2] (x, y), got shape "
                         f"{tuple(location_shape)} with images {tuple(image_shape)}")
    check_same(("images", "locations"), (image_shape[0], location_shape[0]), "batch size",
               (image_shape, location_shape))
    if g > min(image_shape[1:3]):
        raise ValueError(f"patch_size ({g}) must not exceed the image's height and width; "
                         f"got images {tuple(image_shape)}")


def glimpse_extents(patch_size: int, num_scales: int, scale: int = 2) -> tuple[int, ...]:
    """The sides in pixels of the k patches: g, s g, s^2 g, ..."""
    return tuple(patch_size * scale**i for i in range(num_scales))


def _patch(images: jax.Array, locations: jax.Array, side: int, pool: int) -> jax.Array:
    """The `side` x `side` patch around each location, average-pooled by `pool`:
    `[B, H, W, C]`, `[B, 2]` -> `[B, side / pool, side / pool, C]`."""
    b, h, w, c = images.shape
    zero = jnp.zeros_like(locations[:, 0])
    theta = jnp.stack([
        jnp.stack([zero + side / w, zero, locations[:, 0]], -1),
        jnp.stack([zero, zero + side / h, locations[:, 1]], -1),
    ], -2)
    grid = spatial.affine_grid(theta, (side, side))
    patch = spatial.bilinear_sample(images, grid, "zeros", False)
    g = side // pool
    return patch.reshape(b, g, pool, g, pool, c).mean(axis=(2, 4))


def retina(images: jax.Array, locations: jax.Array, patch_size: int = 12, num_scales: int = 3,
           scale: int = 2) -> jax.Array:
    """The multi-resolution glimpse of each image around its location.

    Args:
      images: `[B, H, W, C]`.
      locations: `[B, 2]` centres (x, y) in [-1, 1] (see the module docstring); values outside
        [-1, 1] are allowed and read zeros beyond the image.
      patch_size: g, the side of the finest patch and of every output patch; at most min(H, W).
      num_scales: k >= 1, the number of patches.
      scale: s >= 1 (int), the ratio of the sides of successive patches.

    Returns:
      `[B, k, g, g, C]` in the images' dtype (sampling in at least float32): patch i covers
      `g s^i` pixels square around the location, average-pooled by `s^i`.

    Raises:
      ValueError: for k < 1, g < 1, s < 1, g larger than the image, locations not `[B, 2]` or
        batch sizes that differ.
    """
    check_retina_args(images.shape, locations.shape, patch_size, num_scales, scale)
    locations = locations.astype(jnp.promote_types(locations.dtype, jnp.float32))
    extents = glimpse_extents(patch_size, num_scales, scale)
    patches = [_patch(images, locations, side, side // patch_size) for side in extents]
    return jnp.stack(patches, axis=1).astype(images.dtype)


class GlimpseSensor(nn.Module):
    """The retina of RAM (Mnih et al. 2014) as a parameter-free module; see `retina`.

    Differences from the reference (`Retina.foveate`): locations are not rounded to whole
    pixels (bilinear sampling makes the glimpse differentiable and shift-continuous); the output
    keeps the patches apart, `[B, k, g, g, C]`, instead of flattening them (the glimpse network
    flattens). It has no parameters, hence no `param_dtype`; `dtype` casts the output.

    Attributes:
      patch_size: g, the side of every output patch (12 for 60x60 in the paper).
      num_scales: k, the number of patches (3 in the paper).
      scale: the ratio of the sides of successive patches (2 in the paper).
    """

    patch_size: int = 12
    num_scales: int = 3
    scale: int = 2
    dtype: jnp.dtype | None = None

    def __call__(self, images: jax.Array, locations: jax.Array) -> jax.Array:
        """`[B, H, W, C]`, `[B, 2]` (x, y) -> `[B, k, g, g, C]`."""
        if self.dtype is not None:
            images = images.astype(self.dtype)
        return retina(images, locations, self.patch_size, self.num_scales, self.scale)
