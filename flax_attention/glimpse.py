"""The glimpse sensor (retina) of the Recurrent Attention Model.

Mnih, Heess, Graves, Kavukcuoglu: "Recurrent Models of Visual Attention", NeurIPS 2014; the
reference is kevinzakka/recurrent-visual-attention (`Retina.foveate`). The retina extracts
`num_scales` square patches centred on a location, of sides g, s g, s^2 g... (s the scale
factor, 2 in the paper), and resizes each to g x g: a bandwidth-limited, multi-resolution view.

Every patch is the reference's crop + `avg_pool2d`, generalised to locations between pixels: the
patch of side `g s^i` is an axis-aligned grid of `g s^i` pixel centres, sampled bilinearly with
zero padding, then average-pooled by `s^i` to g x g (where the patch is pixel-aligned this is
exactly the crop; the reference rounds the location to whole pixels). It is jit/vmap friendly
and differentiable w.r.t. the image and the location, with two implementations:

- "gather": the gather-based sampler of the spatial transformer (`affine_grid` with
  align_corners=False, `bilinear_sample`), then a reshape-mean;
- "separable": bilinear interpolation with zero padding and the box average are both separable
  in y and x, so each patch is `Wy @ image @ Wx^T` with per-axis weights `[B, g, H]` and
  `[B, g, W]` (two batched matmuls, no gather; equal to "gather" up to float rounding). The
  default: in RAM's training step (60 x 60 images, 3 scales of 12) it is about 1.6x faster
  than "gather" on a CPU, and matmuls suit accelerators.

Locations are (x, y) in [-1, 1]^2, torch's grid order: x indexes the width, y the height;
(-1, -1) is the top-left corner of the image (the outer pixel edges, as align_corners=False),
(0, 0) its centre. The rule for sizes: the finest patch (side g) must fit in the image
(g <= min(H, W)); the coarser ones may extend beyond it and read zeros there, as may every patch
near the border.

Axis legend: B batch, H height, W width, C channels; k scales, g the patch side.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attention._checks import check_choice, check_same
from flax_attention.functional import spatial

__all__ = ["GlimpseSensor", "IMPLEMENTATIONS", "check_retina_args", "glimpse_extents",
           "plot_glimpse_path", "retina", "to_pixels"]

IMPLEMENTATIONS = ("gather", "separable")


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


def _gather_patch(images: jax.Array, locations: jax.Array, side: int, pool: int) -> jax.Array:
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


def _axis_weights(centre: jax.Array, size: int, side: int, pool: int) -> jax.Array:
    """Along one axis of `size` pixels: the weights `[B, side / pool, size]` of the bilinear
    samples at the `side` pixel centres around `centre` `[B]` (normalised), averaged by `pool`;
    neighbours outside the image get no weight (zero padding)."""
    first = (centre + 1) * (size / 2) - side / 2  # pixel index of the first sample
    position = first[:, None] + jnp.arange(side, dtype=centre.dtype)
    low = jnp.floor(position)
    frac = (position - low)[..., None]
    low = low.astype(jnp.int32)
    weights = ((1 - frac) * jax.nn.one_hot(low, size, dtype=centre.dtype)
               + frac * jax.nn.one_hot(low + 1, size, dtype=centre.dtype))
    return weights.reshape(-1, side // pool, pool, size).mean(axis=2)


def _separable_patch(images: jax.Array, locations: jax.Array, side: int, pool: int) -> jax.Array:
    """As `_gather_patch`, by two matmuls with the per-axis weights."""
    h, w = images.shape[1:3]
    wy = _axis_weights(locations[:, 1], h, side, pool)
    wx = _axis_weights(locations[:, 0], w, side, pool)
    return jnp.einsum("bih,bhwc,bjw->bijc", wy, images.astype(wy.dtype), wx,
                      precision=jax.lax.Precision.HIGHEST)


_PATCH = {"gather": _gather_patch, "separable": _separable_patch}


def retina(images: jax.Array, locations: jax.Array, patch_size: int = 12, num_scales: int = 3,
           scale: int = 2, implementation: str | None = None) -> jax.Array:
    """The multi-resolution glimpse of each image around its location.

    Args:
      images: `[B, H, W, C]`.
      locations: `[B, 2]` centres (x, y) in [-1, 1] (see the module docstring); values outside
        [-1, 1] are allowed and read zeros beyond the image.
      patch_size: g, the side of the finest patch and of every output patch; at most min(H, W).
      num_scales: k >= 1, the number of patches.
      scale: s >= 1 (int), the ratio of the sides of successive patches.
      implementation: "gather", "separable" (see the module docstring) or None for
        "separable".

    Returns:
      `[B, k, g, g, C]` in the images' dtype (sampling in at least float32): patch i covers
      `g s^i` pixels square around the location, average-pooled by `s^i`.

    Raises:
      ValueError: for k < 1, g < 1, s < 1, g larger than the image, locations not `[B, 2]`,
        batch sizes that differ or an unknown implementation.
    """
    check_retina_args(images.shape, locations.shape, patch_size, num_scales, scale)
    implementation = implementation or "separable"
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    locations = locations.astype(jnp.promote_types(locations.dtype, jnp.float32))
    extents = glimpse_extents(patch_size, num_scales, scale)
    patch = _PATCH[implementation]
    patches = [patch(images, locations, side, side // patch_size) for side in extents]
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
      implementation: "gather", "separable" or None (see `retina`).
    """

    patch_size: int = 12
    num_scales: int = 3
    scale: int = 2
    implementation: str | None = None
    dtype: jnp.dtype | None = None

    def __call__(self, images: jax.Array, locations: jax.Array) -> jax.Array:
        """`[B, H, W, C]`, `[B, 2]` (x, y) -> `[B, k, g, g, C]`."""
        if self.dtype is not None:
            images = images.astype(self.dtype)
        return retina(images, locations, self.patch_size, self.num_scales, self.scale,
                      self.implementation)


# --- plotting -----------------------------------------------------------------------------------


def to_pixels(locations: np.ndarray, height: int, width: int) -> np.ndarray:
    """Locations (x, y) in [-1, 1] -> (column, row) in the pixel coordinates of `imshow` (pixel
    centres at integers, the image from -0.5 to W - 0.5): `[..., 2]` -> `[..., 2]`."""
    locations = np.asarray(locations, np.float64)
    return (locations + 1) * np.array([width, height]) / 2 - 0.5


def plot_glimpse_path(images: np.ndarray, locations: np.ndarray, path: str | Path,
                      patch_size: int = 12, num_scales: int = 3, scale: int = 2,
                      titles: Sequence[str] | None = None) -> Path:
    """Draws where RAM looked: one row per image, one panel per glimpse, to a PNG.

    Panel t shows the image, the path of the glimpse centres up to t (dots joined by a line)
    and the k squares of glimpse t (matplotlib, Agg backend).

    Args:
      images: `[B, H, W, C]` (C = 1 or 3) in [0, 1].
      locations: `[B, L, 2]` glimpse centres (x, y) in [-1, 1], as `RamOutput.locations`.
      path: the PNG to write (its directory is created).
      patch_size, num_scales, scale: the retina's, for the squares.
      titles: a title for each row (e.g. "label 3, predicted 3"), or None.

    Returns:
      `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images, locations = np.asarray(images), np.asarray(locations)
    if images.ndim != 4 or locations.ndim != 3 or locations.shape[::2] != (len(images), 2):
        raise ValueError(f"need images [B, H, W, C] and locations [B, L, 2]; got images "
                         f"{images.shape} and locations {locations.shape}")
    (b, h, w, c), steps = images.shape, locations.shape[1]
    centres = to_pixels(locations, h, w)
    extents = glimpse_extents(patch_size, num_scales, scale)
    fig, axes = plt.subplots(b, steps, figsize=(1.8 * steps, 1.9 * b), squeeze=False)
    for i, row in enumerate(axes):
        for t, ax in enumerate(row):
            ax.imshow(images[i, ..., 0] if c == 1 else images[i], cmap="gray", vmin=0, vmax=1)
            ax.plot(centres[i, :t + 1, 0], centres[i, :t + 1, 1], "-o", color="tab:orange",
                    markersize=2, linewidth=1)
            for side in extents:
                corner = centres[i, t] - side / 2
                ax.add_patch(Rectangle(tuple(corner), side, side, fill=False, linewidth=1,
                                       edgecolor="tab:red"))
            ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5), xticks=[], yticks=[])
            ax.set_title(f"glimpse {t + 1}", fontsize=7)
        if titles is not None:
            row[0].set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
