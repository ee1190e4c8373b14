"""Pure functions: the sampling of spatial transformer networks (Jaderberg et al., NeurIPS 2015).

`affine_grid` and `bilinear_sample` match `torch.nn.functional.affine_grid` and
`torch.nn.functional.grid_sample(mode="bilinear")` (as computed by torch's CPU kernel), for both
`align_corners` settings and the three padding modes, values and gradients. Grids hold (x, y)
in [-1, 1], torch's order: x indexes the width, y the height.

Gradient conventions, as torch's: a coordinate exactly on a pixel (integer) takes its slope from
the pixel to its right/below (`floor`), and a coordinate clipped by "border" or "reflection"
padding has zero gradient when it lies on or beyond the clip limits (0 and size - 1).

`bilinear_sample(implementation=...)` picks the XLA gathers and scatter-add below or the Pallas
kernels of `flax_attention.kernels.bilinear` (behind their own `custom_vjp`); both share the
coordinate math here, so every padding mode and `align_corners` value runs on either. The
corner, weight, gather and gradient primitives are `flax_attention.functional.sampling`'s.

Axis legend: B batch, H height, W width, C channels; h, w the size of the sampling grid.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import (
    as_float,
    check_choice,
    check_nonempty,
    check_rank,
    check_same,
)
from flax_attention.functional.sampling import (
    corner_dots,
    corner_rows,
    corner_weights,
    gather_corners,
    grid_gradient,
    images_per_step,
    inside_corner_weight_list,
    inside_corner_weights,
    scatter_corners,
    split_batch,
)
from flax_attention.kernels import bilinear as kernel
from flax_attention.kernels._common import on_gpu, pick_implementation

__all__ = ["IMPLEMENTATIONS", "PADDING_MODES", "TRANSFORMS", "affine_grid", "affine_matrix",
           "bilinear_sample"]

IMPLEMENTATIONS = ("xla", "pallas", None)  # of `bilinear_sample`
PADDING_MODES = ("zeros", "border", "reflection")

# The transforms a spatial transformer can predict, each with its identity parameters (whose
# count is the transform's parameter count); see `affine_matrix`.
TRANSFORMS: dict[str, tuple[float, ...]] = {
    "affine": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "translation": (0.0, 0.0),
    "translation_scale": (1.0, 0.0, 0.0),
    "rotation_translation_scale": (0.0, 1.0, 0.0, 0.0),
}


def _check_hw(out_hw) -> tuple[int, int]:
    try:
        hw = tuple(operator.index(s) for s in out_hw)
    except TypeError:
        hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"out_hw must be two positive ints (height, width), got {out_hw!r}")
    return hw


def _base_coords(size: int, align_corners: bool, dtype) -> jax.Array:
    """Normalised coordinates of `size` pixel centres `[size]` (torch's `linspace_from_neg_one`)."""
    if size == 1:
        return jnp.zeros((1,), dtype)
    i = jnp.arange(size, dtype=dtype)
    if align_corners:
        return 2 * i / (size - 1) - 1
    return (2 * i + 1 - size) / size


def affine_grid(theta: jax.Array, out_hw: tuple[int, int], align_corners: bool = False,
                precision: lax.PrecisionLike = None) -> jax.Array:
    """The sampling grid of an affine transform (torch's `affine_grid` for 2-D).

    Args:
      theta: `[B, 2, 3]` affine matrices mapping output coordinates (x, y, 1) to input (x, y).
      out_hw: (h, w), the size of the grid.
      align_corners: if True, -1 and 1 are the centres of the corner pixels; if False (torch's
        default), the outer edges of the corner pixels.
      precision: of the matrix product.

    Returns:
      `[B, h, w, 2]` normalised (x, y) source coordinates, in theta's dtype (computed in at
      least float32; float32 for an integer theta).
    """
    theta = as_float(theta)
    check_rank("theta", theta, 3, "[B, 2, 3]")
    if theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must have shape [B, 2, 3], got shape {tuple(theta.shape)}")
    h, w = _check_hw(out_hw)
    theta = jnp.asarray(theta)
    dtype = jnp.promote_types(theta.dtype, jnp.float32)
    xs, ys = _base_coords(w, align_corners, dtype), _base_coords(h, align_corners, dtype)
    xs, ys = jnp.broadcast_to(xs, (h, w)), jnp.broadcast_to(ys[:, None], (h, w))
    base = jnp.stack([xs, ys, jnp.ones((h, w), dtype)], axis=-1)  # [h, w, 3]
    grid = jnp.einsum("hwk,bjk->bhwj", base, theta.astype(dtype), precision=precision)
    return grid.astype(theta.dtype)


def affine_matrix(params: jax.Array, transform: str = "affine") -> jax.Array:
    """The affine matrices of a (restricted) transform's parameters.

    Args:
      params: `[B, P]`, P the transform's parameter count (`len(TRANSFORMS[transform])`):
        "affine": the six entries of theta, row by row (torch's `view(-1, 2, 3)`);
        "translation": (tx, ty); "translation_scale": (s, tx, ty), an isotropic scale (the
        paper's attention transform); "rotation_translation_scale": (angle, s, tx, ty), angle
        in radians. Rotations and scales act on normalised coordinates, so on a non-square
        image they are not rigid in pixels.
      transform: a key of `TRANSFORMS`.

    Returns:
      theta `[B, 2, 3]` for `affine_grid`, in params' dtype.
    """
    params = as_float(params)
    check_choice("transform", transform, TRANSFORMS)
    check_rank("params", params, 2, "[B, P]")
    count = len(TRANSFORMS[transform])
    if params.shape[1] != count:
        raise ValueError(f"params of a {transform!r} transform must have shape [B, {count}], "
                         f"got shape {tuple(params.shape)}")
    params = jnp.asarray(params)
    if transform == "affine":
        return params.reshape(-1, 2, 3)
    zero, one = jnp.zeros_like(params[:, 0]), jnp.ones_like(params[:, 0])
    if transform == "translation":
        (tx, ty), (a, b) = params.T, (one, zero)
    elif transform == "translation_scale":
        (a, tx, ty), b = params.T, zero
    else:
        angle, scale, tx, ty = params.T
        a, b = scale * jnp.cos(angle), scale * jnp.sin(angle)
    return jnp.stack([a, -b, tx, b, a, ty], axis=-1).reshape(-1, 2, 3)


# --- Source coordinates: normalised -> pixel, with torch's padding and its gradient conventions. -


def _clip(ix: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Clips to [0, size - 1]; the slope is 0 on and beyond the limits (torch's convention)."""
    inside = (ix > 0) & (ix < size - 1)
    return jnp.clip(ix, 0, size - 1), inside.astype(ix.dtype)


def _reflect(ix: jax.Array, size: int, align_corners: bool) -> tuple[jax.Array, jax.Array]:
    """Reflects about the image borders (pixel centres, or edges if not `align_corners`)."""
    low, twice_span = (0.0, 2 * (size - 1)) if align_corners else (-0.5, 2 * size)
    if twice_span == 0:  # a single pixel with aligned corners: every coordinate maps to it
        return jnp.zeros_like(ix), jnp.zeros_like(ix)
    shifted = ix - low
    distance = jnp.abs(shifted)
    extra = distance - jnp.trunc(distance / twice_span) * twice_span
    reflected = twice_span - extra
    flip = extra > reflected
    slope = jnp.where(flip ^ (shifted < 0), -1.0, 1.0).astype(ix.dtype)
    return jnp.where(flip, reflected, extra) + low, slope


def _source_index(coord: jax.Array, size: int, padding_mode: str,
                  align_corners: bool) -> tuple[jax.Array, jax.Array]:
    """Normalised coordinates -> pixel coordinates and d(pixel) / d(normalised).

    For "zeros", pixel coordinates are clamped to [-2, size], which changes nothing (both
    neighbours of a coordinate beyond that range are outside the image anyway) but keeps the
    integer corner indices bounded.
    """
    # torch's `grid_sampler_unnormalize`, operation for operation, so that a coordinate that
    # lands on a pixel centre or edge there lands on it here too
    if align_corners:
        scale = (size - 1) / 2
        ix = (coord + 1) / 2 * (size - 1)
    else:
        scale = size / 2
        ix = ((coord + 1) * size - 1) / 2
    slope = jnp.full_like(ix, scale)
    if padding_mode == "zeros":
        return jnp.clip(ix, -2, size), slope
    if padding_mode == "reflection":
        ix, reflect_slope = _reflect(ix, size, align_corners)
        slope = slope * reflect_slope
    ix, clip_slope = _clip(ix, size)
    return ix, slope * clip_slope


# --- Sampling: four corner gathers with bilinear weights (`functional.sampling`). -------------


def _locate(grid: jax.Array, hw: tuple[int, int], padding_mode: str, align_corners: bool):
    """Top-left corners y0, x0 `[B, h, w]` (int32), the distances dy, dx in [0, 1) to them and
    the slopes d(pixel) / d(normalised) of every grid point, in at least float32."""
    grid = grid.astype(jnp.promote_types(grid.dtype, jnp.float32))
    iy, slope_y = _source_index(grid[..., 1], hw[0], padding_mode, align_corners)
    ix, slope_x = _source_index(grid[..., 0], hw[1], padding_mode, align_corners)
    y0, x0 = jnp.floor(iy), jnp.floor(ix)
    return y0.astype(jnp.int32), x0.astype(jnp.int32), iy - y0, ix - x0, slope_y, slope_x


def _sample(image: jax.Array, grid: jax.Array, padding_mode: str,
            align_corners: bool) -> jax.Array:
    """The primal computation of `bilinear_sample` (plain autodiff also differentiates it)."""
    hw = image.shape[1:3]
    y0, x0, dy, dx, _, _ = _locate(grid, hw, padding_mode, align_corners)
    values = gather_corners(image.astype(dy.dtype), *corner_rows(y0, x0, hw))
    out = sum(w[..., None] * v for w, v in zip(corner_weights(dy, dx), values, strict=True))
    return out.astype(image.dtype)


# Images per step of the loops over the batch: the largest divisor of the batch whose output
# has at most this many elements, so that a step's intermediates stay in cache. Measured on CPU
# at B=64, C=32, 64x64: the backward, whose scatter-adds read 4x that many updates, runs 2.5x
# faster than in one step over the whole batch; the forward of a gradient in a loop keeps a
# summed output (a loss) from materialising the four gathered neighbours: XLA:CPU's YNNPACK
# fusion takes the sum and the weighting, and the gathers it cannot fuse become four arrays.
_CHUNK_ELEMENTS = 2**18


def _over_chunks(fn, out_shape: tuple[int, ...], *arrays: jax.Array):
    """`fn(*arrays)` over chunks of the batch (the leading axis of every array), in sequence."""
    chunk = images_per_step(out_shape, _CHUNK_ELEMENTS)
    out = lax.map(lambda args: fn(*args), tuple(split_batch(a, chunk) for a in arrays))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bilinear_sample(image: jax.Array, grid: jax.Array, padding_mode: str,
                     align_corners: bool) -> jax.Array:
    return _sample(image, grid, padding_mode, align_corners)


def _sample_fwd(image, grid, padding_mode, align_corners):
    out = _over_chunks(functools.partial(_sample, padding_mode=padding_mode,
                                         align_corners=align_corners),
                       (*grid.shape[:3], image.shape[-1]), image, grid)
    return out, (image, grid)


def _sample_bwd(padding_mode, align_corners, residuals, g):
    """Over chunks of the batch, in sequence: the image gradient scatter-added in place into
    one `[B * H * W, C]` accumulator (`sampling.scatter_corners`; no per-chunk buffers to zero
    and copy out), the grid gradient from the corner dots and the slopes. The residuals are
    just the inputs: corners and weights are cheap to recompute."""
    image, grid = residuals
    hw, channels = image.shape[1:3], image.shape[-1]
    dtype = jnp.promote_types(grid.dtype, jnp.float32)  # `_locate`'s
    flat = jnp.asarray(image, dtype).reshape(-1, channels)
    chunk = images_per_step(g.shape, _CHUNK_ELEMENTS)

    def step(d_image, args):
        index, grid, g = args
        y0, x0, dy, dx, slope_y, slope_x = _locate(grid, hw, padding_mode, align_corners)
        rows, inside = corner_rows(y0, x0, hw, index * chunk)
        g = g.astype(dtype)
        dots = corner_dots(gather_corners(flat, rows, inside), g)
        d_image = scatter_corners(d_image, rows, inside_corner_weight_list(dy, dx, inside), g)
        return d_image, grid_gradient(dots, dy, dx, slope_y, slope_x).astype(grid.dtype)

    steps = jnp.arange(image.shape[0] // chunk, dtype=jnp.int32)
    d_image, d_grid = lax.scan(step, jnp.zeros(flat.shape, dtype),
                               (steps, split_batch(grid, chunk), split_batch(g, chunk)))
    return d_image.reshape(image.shape).astype(image.dtype), d_grid.reshape(grid.shape)


_bilinear_sample.defvjp(_sample_fwd, _sample_bwd)
_bilinear_sample_xla = jax.jit(_bilinear_sample, static_argnums=(2, 3))


# --- The Pallas implementation: XLA locates the corners, `kernels.bilinear` gathers. -----------


def _kernel_corners(grid: jax.Array, hw: tuple[int, int], padding_mode: str,
                    align_corners: bool) -> tuple[jax.Array, jax.Array]:
    """The kernel's inputs: rows `[4, L]` of the four neighbours in the flattened image and
    their weights `[4, L]` (float32, 0 outside the image), L = B * h * w. The weights'
    derivative w.r.t. the grid is the slope of `_locate` (torch's conventions), so autodiff
    through them gives the grid gradient of the XLA path from the kernel's weight cotangents."""
    y0, x0, dy, dx, slope_y, slope_x = _locate(lax.stop_gradient(grid), hw, padding_mode,
                                               align_corners)
    coords = grid.astype(dy.dtype)
    moved = coords - lax.stop_gradient(coords)  # 0, with derivative 1
    dy, dx = dy + slope_y * moved[..., 1], dx + slope_x * moved[..., 0]
    rows, inside = corner_rows(y0, x0, hw)
    weights = inside_corner_weights(dy, dx, inside).astype(jnp.float32)
    return rows.reshape(4, -1), weights.reshape(4, -1)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _bilinear_sample_pallas(image: jax.Array, grid: jax.Array, padding_mode: str,
                            align_corners: bool, interpret: bool) -> jax.Array:
    hw, channels = image.shape[1:3], image.shape[-1]
    rows, weights = _kernel_corners(grid, hw, padding_mode, align_corners)
    out = kernel.bilinear_gather(image.reshape(-1, channels), rows, weights, hw[1] + 1,
                                 kernel.BlockSizes(), interpret)
    return out.reshape(*grid.shape[:3], channels)


def bilinear_sample(image: jax.Array, grid: jax.Array, padding_mode: str = "zeros",
                    align_corners: bool = False, implementation: str | None = None) -> jax.Array:
    """Samples `image` bilinearly at the normalised coordinates of `grid` (torch's
    `grid_sample(mode="bilinear")`).

    Differentiable w.r.t. both arguments in reverse mode, through a custom VJP (`jax.jvp` is not
    supported). Coordinates, weights and sums are computed in at least float32; pixels are
    indexed with int32 (B * H * W below 2**31). Each implementation is jitted, with
    `padding_mode` and `align_corners` static.

    Args:
      image: `[B, H, W, C]`.
      grid: `[B, h, w, 2]` source coordinates (x, y); (-1, -1) is the top-left of the image.
      padding_mode: what coordinates outside the image read: "zeros" (each outside neighbour
        counts as 0, with its weight unchanged), "border" (coordinates are clipped to the
        image), "reflection" (coordinates are reflected about the borders, then clipped).
      align_corners: as in `affine_grid`.
      implementation: "xla" (gathers and a scatter-add), "pallas" (the kernels of
        `flax_attention.kernels.bilinear`: float32, bfloat16 or float16 inputs; interpreted
        off the GPU) or None (XLA: the kernels have not been timed on a GPU yet).

    Returns:
      `[B, h, w, C]` in image's dtype (float32 for an integer or boolean image).

    Raises:
      ValueError: wrong ranks or batch sizes, an empty `image`, an unknown `padding_mode` or
        `implementation`.
    """
    image, grid = as_float(image), as_float(grid)
    check_rank("image", image, 4, "[B, H, W, C]")
    check_nonempty("image", image, "[B, H, W, C]")
    check_rank("grid", grid, 4, "[B, h, w, 2]")
    if grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape [B, h, w, 2] (x, y), got {tuple(grid.shape)}")
    check_same(("image", "grid"), (image.shape[0], grid.shape[0]), "batch size",
               (image.shape, grid.shape))
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    image, grid = jnp.asarray(image), jnp.asarray(grid)
    reasons = {"pallas": kernel.unsupported(image, grid)}
    if pick_implementation("bilinear_sample", implementation, IMPLEMENTATIONS,
                           reasons) == "pallas":
        return _bilinear_sample_pallas(image, grid, padding_mode, align_corners, not on_gpu())
    return _bilinear_sample_xla(image, grid, padding_mode, align_corners)
