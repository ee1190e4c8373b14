"""Pure functions: the bilinear-sampling primitives shared by the sampling mechanisms.

`functional.spatial` (torch's `grid_sample`), `functional.deform_conv` (torchvision's
`deform_conv2d`) and `functional.deformable_attention` (Deformable DETR) all read an image at
fractional pixel coordinates from its four neighbours. Each computes its own pixel coordinates
(padding modes, kernel taps, feature levels); these functions do the rest: the neighbours' rows
in the flattened image, their bilinear weights, the gathers, and the pieces of the hand-written
VJPs (the image gradient's scatter-add and the coordinate gradient from the neighbours' channel
dot products with the output gradient).

The four neighbours of a point with top-left neighbour (y0, x0) are always in the order
(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1): north-west, north-east, south-west,
south-east. A neighbour outside the image counts 0 (torch's "zeros" padding; the other padding
modes clip the coordinates before, so their neighbours are inside).

Axis legend: B batch, H height, W width, C channels; h, w the size of the sampling grid (any
number of point axes `...` where noted).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["corner_dots", "corner_rows", "corner_weights", "gather_corners", "grid_gradient",
           "images_per_step", "inside_corner_weight_list", "inside_corner_weights",
           "scatter_corners", "split_batch"]


def corner_rows(y0: jax.Array, x0: jax.Array, hw: tuple[int, int],
                first_image: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Rows of the four neighbours in the flattened image `[B * H * W, C]`.

    Args:
      y0, x0: `[B, h, w]` int32 top-left neighbours (any integers: the rows are clipped).
      hw: (H, W) of the image.
      first_image: the index of the first of these B images in the flattened batch (a chunk's
        offset in a loop over a larger batch).

    Returns:
      rows `[4, B, h, w]` int32 (a neighbour outside the image points at a clipped, valid row)
      and inside `[4, B, h, w]` bool, whether each neighbour is inside the image.
    """
    height, width = hw
    images = first_image + jnp.arange(y0.shape[0], dtype=jnp.int32)
    first_row = (images * height)[:, None, None]
    rows, inside = [], []
    for y, x in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        inside.append((y >= 0) & (y < height) & (x >= 0) & (x < width))
        rows.append((first_row + jnp.clip(y, 0, height - 1)) * width + jnp.clip(x, 0, width - 1))
    return jnp.stack(rows), jnp.stack(inside)


def gather_corners(image: jax.Array, rows: jax.Array, inside: jax.Array) -> list[jax.Array]:
    """The four neighbours' values, 0 outside the image.

    Four separate gathers, which XLA fuses into their consumers (one stacked gather would be
    materialised).

    Args:
      image: `[B, H, W, C]` (or any `[..., C]` whose rows `rows` indexes).
      rows, inside: `[4, ...]` from `corner_rows`.

    Returns:
      four `[..., C]` arrays in image's dtype.
    """
    flat = image.reshape(-1, image.shape[-1])
    return [
        jnp.where(inside[k, ..., None], flat.at[rows[k]].get(mode="promise_in_bounds"), 0)
        for k in range(4)
    ]


def corner_weights(dy: jax.Array, dx: jax.Array) -> list[jax.Array]:
    """Bilinear weights of the four neighbours `[...]` each, from the distances dy, dx `[...]`
    in [0, 1) of the points to their top-left neighbours."""
    return [(1 - dy) * (1 - dx), (1 - dy) * dx, dy * (1 - dx), dy * dx]


def inside_corner_weights(dy: jax.Array, dx: jax.Array, inside: jax.Array) -> jax.Array:
    """`corner_weights` stacked `[4, ...]`, 0 for the neighbours outside the image
    (inside `[4, ...]`)."""
    return jnp.stack(inside_corner_weight_list(dy, dx, inside))


def inside_corner_weight_list(dy: jax.Array, dx: jax.Array, inside: jax.Array) -> list[jax.Array]:
    """`inside_corner_weights` as four arrays `[...]`: each neighbour's update of the image
    gradient then reads its own weights, not a slice of a stack that XLA:CPU materialises."""
    return [jnp.where(inside[k], w, 0) for k, w in enumerate(corner_weights(dy, dx))]


def corner_dots(values: list[jax.Array], g: jax.Array) -> tuple[jax.Array, ...]:
    """`sum_C(value * g)` `[...]` for each neighbour's values `[..., C]` and the output gradient
    g `[..., C]` (broadcastable), in one variadic reduction over the last axis: XLA then fuses
    the gathers into it instead of materialising the four gathered arrays."""
    products = tuple(v * g for v in values)
    zero = jnp.zeros((), products[0].dtype)
    return lax.reduce(products, (zero,) * len(values),
                      lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
                      (products[0].ndim - 1,))


def grid_gradient(dots: tuple[jax.Array, ...], dy: jax.Array, dx: jax.Array,
                  slope_y: jax.Array | float, slope_x: jax.Array | float) -> jax.Array:
    """The gradient w.r.t. the points' coordinates `[..., 2]` (x, y).

    Args:
      dots: each neighbour's `sum_C(value * g)` `[...]` (0 outside the image), `corner_dots`.
      dy, dx: `[...]` distances to the top-left neighbours.
      slope_y, slope_x: d(pixel coordinate) / d(coordinate) `[...]` or scalars.

    Returns:
      `[..., 2]`: differences of the neighbours along x and y, times the slopes.
    """
    nw, ne, sw, se = dots
    d_x = ((1 - dy) * (ne - nw) + dy * (se - sw)) * slope_x
    d_y = ((1 - dx) * (sw - nw) + dx * (se - ne)) * slope_y
    return jnp.stack([d_x, d_y], axis=-1)


def scatter_corners(d_flat: jax.Array, rows: jax.Array, weights, g: jax.Array) -> jax.Array:
    """Adds the four neighbours' weighted copies of g to their rows of `d_flat` `[R, C]`.

    One scatter-add per neighbour: a single scatter of the four stacked neighbours makes
    XLA:CPU build the stacked updates in a loop that recomputes every neighbour's weight per
    channel (the backward of `functional.spatial` ran about a third faster without it).

    Args:
      d_flat: `[R, C]`, the flattened image gradient so far (rows index it).
      rows: `[4, ...]` from `corner_rows`.
      weights: the four neighbours' weights `[...]` (`inside_corner_weight_list`).
      g: `[..., C]` gradient of the samples, in d_flat's dtype.

    Returns:
      `[R, C]`.
    """
    channels = d_flat.shape[-1]
    for k in range(4):
        d_flat = d_flat.at[rows[k].reshape(-1)].add(
            (weights[k][..., None] * g).reshape(-1, channels), mode="promise_in_bounds")
    return d_flat


def images_per_step(out_shape: tuple[int, ...], max_elements: int) -> int:
    """Images per step of a loop over the batch: the largest divisor of the batch (the leading
    axis of `out_shape`) whose share of the output has at most `max_elements` elements (at
    least 1). Inside a loop, XLA allocates a step's intermediates once and reuses them, so
    they stay in cache and fault in no fresh pages."""
    batch, per_image = out_shape[0], math.prod(out_shape[1:])
    return max(n for n in range(1, batch + 1)
               if batch % n == 0 and (n == 1 or n * per_image <= max_elements))


def split_batch(a: jax.Array, chunk: int) -> jax.Array:
    """`[B, ...]` -> `[B / chunk, chunk, ...]`."""
    return a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])
