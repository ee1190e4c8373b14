"""Pure functions: deformable convolution (Dai et al.: "Deformable Convolutional Networks", ICCV
2017) and its modulated form (Zhu et al.: "Deformable ConvNets v2", CVPR 2019), with the
semantics of torchvision's `ops.deform_conv2d` translated to NHWC.

Every kernel tap (i, j) of every output position reads the input at
`y = oy * stride_h - pad_h + i * dilation_h + dy`, `x = ox * stride_w - pad_w + j * dilation_w
+ dx`, bilinearly, each of the four neighbouring pixels outside the image counting 0 (so a point
at y <= -1, y >= H, x <= -1 or x >= W reads 0, as torchvision's `bilinear_interpolate`). The
offsets (dy, dx) come per offset group (consecutive blocks of C / G input channels), per tap and
per output position; DCNv2's mask multiplies each sample. The samples form the columns of an
im2col `[B, Ho, Wo, kh * kw, C]`, contracted with the kernel in one matrix product per group
that accumulates in float32.

Layouts (torchvision's channel orders, moved last):
- offset `[B, Ho, Wo, 2 * G * kh * kw]`: channel `2 * (g * kh * kw + i * kw + j)` holds dy,
  the next one dx;
- mask `[B, Ho, Wo, G * kh * kw]`: channel `g * kh * kw + i * kw + j`;
- weight: Flax's HWIO `[kh, kw, C / groups, O]` (torchvision's `[O, C / groups, kh, kw]`,
  transposed); groups = C // weight.shape[2], as torchvision infers them.

Differentiable w.r.t. x, offset, mask, weight and bias in reverse mode: the sampling has a
custom VJP (one scatter-add for x, the neighbours' differences for the offsets; `jax.jvp` is not
supported), the rest is autodiff. Gradients w.r.t. the offsets follow torchvision's convention:
a coordinate exactly on a pixel takes its slope from the pixel below / to the right (`floor`).
Pixels are indexed with int32 (B * G * H * W below 2**31).

Axis legend: B batch, H height, W width, C input channels, O output channels, G offset groups,
K = kh * kw kernel taps, Q = Ho * Wo output positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import (
    as_float,
    check_divisible,
    check_image,
    check_nonempty,
    check_positive,
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
    scatter_corners,
    split_batch,
)

__all__ = ["deform_conv2d", "deform_conv2d_points", "deform_im2col"]

Pair = int | tuple[int, int]


def _pair(name: str, value: Pair, minimum: int) -> tuple[int, int]:
    """`value` as (height, width), each an integer >= `minimum` (ValueError naming `name`)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r}")
    for v in pair:
        check_positive(name, v, minimum)
    return pair  # type: ignore[return-value]


def _output_hw(in_hw, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution (torch's formula); the settings are (height, width) pairs."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in  # type: ignore
                 zip(in_hw, kernel_hw, stride, padding, dilation, strict=True))


def _geometry(x_shape, offset, kernel_hw, stride, padding, dilation):
    """Checks the offset against the input and the kernel; returns the offset groups and the
    normalised stride, padding and dilation pairs."""
    check_rank("offset", offset, 4, "[B, Ho, Wo, 2 * G * kh * kw]")
    stride, dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
    padding = _pair("padding", padding, 0)
    out_hw = _output_hw(x_shape[1:3], kernel_hw, stride, padding, dilation)
    if min(out_hw) < 1:
        raise ValueError(f"x {tuple(x_shape)} is too small for a {kernel_hw} kernel with "
                         f"stride {stride}, padding {padding}, dilation {dilation}: the output "
                         f"would be {out_hw}")
    taps = 2 * kernel_hw[0] * kernel_hw[1]
    if offset.shape[-1] % taps or offset.shape[-1] == 0:
        raise ValueError(f"offset must have 2 * G * kh * kw channels (a positive multiple of "
                         f"{taps} for a {kernel_hw} kernel), got shape {tuple(offset.shape)}")
    check_same(("x", "offset"), (x_shape[0], offset.shape[0]), "batch size",
               (x_shape, offset.shape))
    if tuple(offset.shape[1:3]) != out_hw:
        raise ValueError(f"offset must have the output's spatial size {out_hw} (x "
                         f"{tuple(x_shape)}, kernel {kernel_hw}), got shape "
                         f"{tuple(offset.shape)}")
    return offset.shape[-1] // taps, stride, padding, dilation


def _locations(offset: jax.Array, kernel_hw: tuple[int, int], stride, padding, dilation
               ) -> tuple[jax.Array, jax.Array]:
    """Pixel coordinates y, x `[B, G, Ho, Wo, K]` (at least float32) of every sample."""
    b, ho, wo, channels = offset.shape
    kh, kw = kernel_hw
    dtype = jnp.promote_types(offset.dtype, jnp.float32)
    offset = offset.astype(dtype).reshape(b, ho, wo, channels // (2 * kh * kw), kh * kw, 2)
    offset = jnp.moveaxis(offset, 3, 1)

    def base(size, k, s, p, d):  # [size, k]: the tap positions of every output row (column)
        return (jnp.arange(size, dtype=dtype) * s - p)[:, None] + jnp.arange(k, dtype=dtype) * d

    rows = base(ho, kh, stride[0], padding[0], dilation[0])  # [Ho, kh]
    cols = base(wo, kw, stride[1], padding[1], dilation[1])  # [Wo, kw]
    y = jnp.broadcast_to(rows[:, None, :, None], (ho, wo, kh, kw)).reshape(ho, wo, kh * kw)
    x = jnp.broadcast_to(cols[None, :, None, :], (ho, wo, kh, kw)).reshape(ho, wo, kh * kw)
    return y + offset[..., 0], x + offset[..., 1]


def _neighbours(hw: tuple[int, int], y: jax.Array, x: jax.Array,
                first_image: jax.Array | int = 0):
    """The four neighbours' rows in the flattened images `[N * H * W, C]` (the first of these
    N images being image `first_image`) and whether they are inside (`sampling.corner_rows`),
    and the distances dy, dx in [0, 1) to the top-left one."""
    y_floor, x_floor = jnp.floor(y), jnp.floor(x)
    # Beyond [-2, size] both neighbours are outside anyway: clamping keeps the indices bounded.
    y0 = jnp.clip(y_floor, -2, hw[0]).astype(jnp.int32)
    x0 = jnp.clip(x_floor, -2, hw[1]).astype(jnp.int32)
    return (*corner_rows(y0, x0, hw, first_image), y - y_floor, x - x_floor)


@jax.custom_vjp
def _sample(image: jax.Array, y: jax.Array, x: jax.Array, scale: jax.Array | None) -> jax.Array:
    """Bilinear samples of `image` `[N, H, W, C]` at pixel coordinates y, x `[N, h, w]`, the
    neighbours outside the image counting 0, each times `scale` `[N, h, w]` (None: 1; folded
    into the four bilinear weights, so that no unscaled samples are made): `[N, h, w, C]` in
    y's dtype."""
    rows, inside, dy, dx = _neighbours(image.shape[1:3], y, x)
    weights = corner_weights(dy, dx)
    if scale is not None:
        weights = [w * scale for w in weights]
    values = gather_corners(image.astype(y.dtype), rows, inside)
    return sum(w[..., None] * v for w, v in zip(weights, values, strict=True))


def _sample_fwd(image, y, x, scale):
    return _sample(image, y, x, scale), (image, y, x, scale)


# Output elements per step of the backward's loop over the images (`sampling.images_per_step`).
# Measured on a 2-core CPU at 8x56x56x64 with 3x3 taps (1.8M sampled elements an image), forward
# and backward, medians of one process: 289 ms with all eight images in one step (whose gathered
# neighbours and scatter updates, 58 MiB each, go to fresh memory), 234 ms with one a step, 222
# ms with two (this budget).
_CHUNK_ELEMENTS = 2**22


def _sample_bwd(residuals, g):
    """Over chunks of the images, in sequence: the image gradient scatter-added into one
    `[N * H * W, C]` accumulator (`sampling.scatter_corners`), the coordinate gradients from the
    corner dots (`grid_gradient`, slope 1) times the scale, the scale's gradient the dots'
    bilinear sum."""
    image, y, x, scale = residuals
    hw, channels = image.shape[1:3], image.shape[-1]
    flat = image.astype(y.dtype).reshape(-1, channels)
    chunk = images_per_step(g.shape, _CHUNK_ELEMENTS)

    def step(d_flat, args):
        index, y, x, g, scale = args
        rows, inside, dy, dx = _neighbours(hw, y, x, index * chunk)
        g = g.astype(y.dtype)
        dots = corner_dots(gather_corners(flat, rows, inside), g)
        weights = inside_corner_weight_list(dy, dx, inside)
        d_flat = scatter_corners(d_flat, rows, weights if scale is None else [
            w * scale for w in weights], g)
        d_x, d_y = jnp.moveaxis(grid_gradient(dots, dy, dx, 1.0, 1.0), -1, 0)
        if scale is None:
            return d_flat, (d_y, d_x, None)
        d_scale = sum(w * dot for w, dot in zip(weights, dots, strict=True))
        return d_flat, (d_y * scale, d_x * scale, d_scale)

    steps = jnp.arange(image.shape[0] // chunk, dtype=jnp.int32)
    xs = (steps, *(a if a is None else split_batch(a, chunk) for a in (y, x, g, scale)))
    d_flat, grads = lax.scan(step, jnp.zeros(flat.shape, flat.dtype), xs)
    d_y, d_x, d_scale = (a if a is None else a.reshape(-1, *a.shape[2:]) for a in grads)
    return (d_flat.reshape(image.shape).astype(image.dtype), d_y, d_x,
            d_scale if d_scale is None else d_scale.astype(scale.dtype))


_sample.defvjp(_sample_fwd, _sample_bwd)


def deform_im2col(x: jax.Array, offset: jax.Array, kernel_size: Pair, stride: Pair = 1,
                  padding: Pair = 0, dilation: Pair = 1, mask: jax.Array | None = None
                  ) -> jax.Array:
    """The columns of a deformable convolution: every tap's bilinear sample, times the mask.

    Args:
      x: `[B, H, W, C]`.
      offset: `[B, Ho, Wo, 2 * G * kh * kw]`, (dy, dx) pairs in torchvision's order (module
        docstring); G divides C.
      kernel_size: (kh, kw) or one int.
      stride, padding, dilation: (height, width) pairs or one int each, as torchvision's.
      mask: None, or `[B, Ho, Wo, G * kh * kw]` (DCNv2's modulation).

    Returns:
      `[B, Ho, Wo, kh * kw, C]` in x's dtype (the samples are computed in at least float32).

    Raises:
      ValueError: wrong ranks, batch or spatial sizes; C not divisible by G; bad settings.
    """
    x, offset, mask = as_float(x), as_float(offset), as_float(mask)
    check_image("x", x)
    kernel_hw = _pair("kernel_size", kernel_size, 1)
    groups, stride, padding, dilation = _geometry(x.shape, offset, kernel_hw, stride, padding,
                                                  dilation)
    b, height, width, channels = x.shape
    check_divisible("x channels", channels, groups, "offset groups G (offset channels / "
                    f"(2 * kh * kw), offset {tuple(offset.shape)})")
    _, ho, wo, _ = offset.shape
    taps = kernel_hw[0] * kernel_hw[1]
    if mask is not None:
        check_rank("mask", mask, 4, "[B, Ho, Wo, G * kh * kw]")
        want = (b, ho, wo, groups * taps)
        if tuple(mask.shape) != want:
            raise ValueError(f"mask must have shape [B, Ho, Wo, G * kh * kw] = {want} for offset "
                             f"{tuple(offset.shape)}, got {tuple(mask.shape)}")
    y, x_loc = _locations(offset, kernel_hw, stride, padding, dilation)  # [B, G, Ho, Wo, K]
    image = jnp.moveaxis(x.reshape(b, height, width, groups, channels // groups), 3, 1)
    if mask is not None:  # [B, G, Ho, Wo, K], like y and x
        mask = jnp.moveaxis(mask.reshape(b, ho, wo, groups, taps), 3, 1).astype(y.dtype)
    samples = _sample(image.reshape(b * groups, height, width, -1),
                      *(a if a is None else a.reshape(b * groups, ho * wo, taps)
                        for a in (y, x_loc, mask)))
    samples = samples.reshape(b, groups, ho, wo, taps, -1)
    return jnp.moveaxis(samples, 1, 4).reshape(b, ho, wo, taps, channels).astype(x.dtype)


def deform_conv2d(x: jax.Array, offset: jax.Array, weight: jax.Array,
                  bias: jax.Array | None = None, stride: Pair = 1, padding: Pair = 0,
                  dilation: Pair = 1, mask: jax.Array | None = None,
                  precision: lax.PrecisionLike = None) -> jax.Array:
    """Deformable convolution, torchvision's `ops.deform_conv2d` in NHWC.

    Args:
      x: `[B, H, W, C]`.
      offset: `[B, Ho, Wo, 2 * G * kh * kw]` (module docstring for the channel order).
      weight: `[kh, kw, C / groups, O]` (Flax's HWIO); groups = C // weight.shape[2] divides O.
      bias: None or `[O]`.
      stride, padding, dilation: (height, width) pairs or one int each.
      mask: None (DCNv1), or `[B, Ho, Wo, G * kh * kw]` multiplying each sample (DCNv2).
      precision: of the contraction of the columns with the kernel.

    Returns:
      `[B, Ho, Wo, O]`, Ho = (H + 2 * pad_h - dilation_h * (kh - 1) - 1) // stride_h + 1 (Wo
      likewise), in the promoted dtype of x and weight; accumulated in float32.

    Raises:
      ValueError: wrong ranks or sizes (naming the argument and the shapes).
    """
    x, weight, bias = as_float(x), as_float(weight), as_float(bias)
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("weight", weight, 4, "[kh, kw, C / groups, O]")
    kh, kw, per_group, features = weight.shape
    check_nonempty("weight", weight, "[kh, kw, C / groups, O]")
    if x.shape[-1] % per_group:
        raise ValueError(f"weight's input channels ({per_group}) must divide x's channels: "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    groups = x.shape[-1] // per_group
    check_divisible("weight output channels O", features, groups,
                    f"groups (x channels / weight.shape[2]: x {tuple(x.shape)}, weight "
                    f"{tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (features,):
        raise ValueError(f"bias must have shape [O] = ({features},) for weight "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    dtype = jnp.result_type(x.dtype, weight.dtype)
    columns = deform_im2col(x.astype(dtype), offset, (kh, kw), stride, padding, dilation, mask)
    b, ho, wo = columns.shape[:3]
    columns = columns.reshape(b * ho * wo, kh * kw, groups, per_group)
    kernel = weight.astype(dtype).reshape(kh * kw, per_group, groups, features // groups)
    accumulate = jnp.promote_types(dtype, jnp.float32)
    # One plain matrix product per group: on the CPU several times faster than one einsum
    # with the groups as a batch dimension (which transposes the columns), even for groups=1.
    out = jnp.concatenate([
        lax.dot(columns[:, :, g].reshape(b * ho * wo, -1), kernel[:, :, g].reshape(
            -1, features // groups), precision=precision, preferred_element_type=accumulate)
        for g in range(groups)], axis=-1).reshape(b, ho, wo, features)
    if bias is not None:
        out = out + bias
    return out.astype(dtype)


def deform_conv2d_points(offset: jax.Array, input_hw: tuple[int, int], kernel_size: Pair,
                         stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1) -> jax.Array:
    """Where a deformable convolution samples, as normalised image coordinates.

    Args:
      offset: `[B, Ho, Wo, 2 * G * kh * kw]`.
      input_hw: (H, W) of the convolution's input.
      kernel_size, stride, padding, dilation: as `deform_conv2d`'s.

    Returns:
      `[B, Q, N, 2]` float32 (x, y) with Q = Ho * Wo, N = G * kh * kw (offset groups first, as
      the offset's channels): `((x + 0.5) / W, (y + 0.5) / H)` of the pixel coordinates, so
      [0, 1] spans the image from edge to edge (Deformable DETR's sampling-location convention).

    Raises:
      ValueError: as `deform_im2col` for the offset.
    """
    offset = as_float(offset)
    kernel_hw = _pair("kernel_size", kernel_size, 1)
    height, width = input_hw
    _, stride, padding, dilation = _geometry((offset.shape[0], height, width), offset,
                                             kernel_hw, stride, padding, dilation)
    y, x = _locations(offset, kernel_hw, stride, padding, dilation)  # [B, G, Ho, Wo, K]
    points = jnp.stack([(x + 0.5) / width, (y + 0.5) / height], axis=-1)
    b, groups, ho, wo, taps, _ = points.shape
    points = jnp.moveaxis(points, 1, 3).reshape(b, ho * wo, groups * taps, 2)
    return points.astype(jnp.float32)
