"""Pure functions: selective-kernel attention (Li, Wang, Hu, Yang: "Selective Kernel Networks",
CVPR 2019), in the form of timm's `timm/layers/selective_kernel.py`.

Axis legend: B batch, H height, W width, C channels, P paths (branches of different receptive
field). The branch convolutions and the BatchNorm between the two attention layers own
parameters and state, so they live in the module (`flax_attention.selective_kernel`); the math
around them is here: the input split, the paths' convolution (`branch_conv`, with a kernel
gradient that is fast on the CPU), the fuse (sum of paths, global average), the select (softmax
over paths) and the weighted sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import (
    as_float,
    check_divisible,
    check_nonempty,
    check_positive,
    check_rank,
    check_same,
)
from flax_attention.functional.sampling import images_per_step
from flax_attention.kernels._common import check_implementation

__all__ = [
    "branch_conv",
    "selective_kernel_fuse",
    "selective_kernel_select",
    "selective_kernel_split",
    "selective_kernel_weights",
]


def selective_kernel_split(x: jax.Array, num_paths: int) -> list[jax.Array]:
    """timm's `split_input`: the channels cut into `num_paths` consecutive equal blocks.

    Args:
      x: `[B, H, W, C]`, C divisible by `num_paths`.
      num_paths: P.

    Returns:
      P arrays `[B, H, W, C / P]`, channels `[p C / P, (p + 1) C / P)` each.
    """
    x = as_float(x)
    check_rank("x", x, 4, "[B, H, W, C]")
    check_positive("num_paths", num_paths)
    check_divisible("x channels", x.shape[-1], num_paths, "num_paths")
    return jnp.split(x, num_paths, axis=-1)


def _check_paths(paths: jax.Array) -> None:
    check_rank("paths", paths, 5, "[B, P, H, W, C]")


def selective_kernel_fuse(paths: jax.Array) -> jax.Array:
    """The fuse step: the paths summed and averaged over space, in float32.

    A plain sum and mean, which XLA differentiates into broadcasts: a variadic `lax.reduce`
    (one spatial sum per path) ran the forward pass about as fast, but its derivative made the
    module's forward and backward 2.5x slower (`benchmarks/selective_kernel.py`).

    Args:
      paths: `[B, P, H, W, C]`, the outputs of the P branches.

    Returns:
      `[B, C]` float32 (float64 for float64 input): `mean_{h, w} sum_p paths[b, p, h, w, c]`.
    """
    paths = as_float(paths)
    _check_paths(paths)
    return paths.astype(jnp.promote_types(paths.dtype, jnp.float32)).sum(1).mean((1, 2))


def selective_kernel_weights(logits: jax.Array, num_paths: int) -> jax.Array:
    """The select step: a softmax over the paths for every channel, in float32.

    Args:
      logits: `[B, P * C]`, timm's `fc_select` output: entry `p * C + c` scores path p of
        channel c.
      num_paths: P.

    Returns:
      `[B, P, C]` float32 (float64 for float64 input) weights summing to 1 over P (empty for
      an empty batch or C = 0).
    """
    logits = as_float(logits)
    check_rank("logits", logits, 2, "[B, P * C]")
    check_positive("num_paths", num_paths)
    check_divisible("logits features", logits.shape[-1], num_paths, "num_paths")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    b, features = logits.shape
    logits = logits.reshape(b, num_paths, features // num_paths).astype(dtype)
    return jax.nn.softmax(logits, axis=1)


def selective_kernel_select(paths: jax.Array | list[jax.Array] | tuple[jax.Array, ...],
                            weights: jax.Array) -> jax.Array:
    """The paths mixed channel by channel: `sum_p weights[b, p, c] * paths[b, p, h, w, c]`.

    The sum over P is unrolled (the P products added in turn): on the CPU, XLA's reduction over
    the paths axis took longer than both branch convolutions (`benchmarks/selective_kernel.py`).

    Args:
      paths: `[B, P, H, W, C]`, or its P entries `[B, H, W, C]` as a list or tuple (what
        `SelectiveKernel` passes, so that no stacked copy is made or differentiated).
      weights: `[B, P, C]`, e.g. from `selective_kernel_weights`.

    Returns:
      `[B, H, W, C]` in paths' dtype.
    """
    weights = as_float(weights)
    if isinstance(paths, (list, tuple)):
        entries = [as_float(p) for p in paths]
        if not entries:
            raise ValueError("paths must hold at least one [B, H, W, C] array, got none")
        for p in entries:
            check_rank("paths entries", p, 4, "[B, H, W, C]")
        shapes = [p.shape for p in entries]
        check_same([f"paths[{i}]" for i in range(len(entries))], shapes, "shape", shapes)
        shape = (shapes[0][0], len(entries), *shapes[0][1:])
    else:
        paths = as_float(paths)
        _check_paths(paths)
        entries, shape = [paths[:, i] for i in range(paths.shape[1])], paths.shape
    check_rank("weights", weights, 3, "[B, P, C]")
    check_same(("paths", "weights"), (shape[:2] + shape[-1:], weights.shape),
               "batch, paths and channels", (shape, weights.shape))
    weights = weights.astype(jnp.result_type(*entries))[:, :, None, None, :]
    return functools.reduce(jnp.add, [p * weights[:, i] for i, p in enumerate(entries)])


def _conv(x, kernel, stride, dilation, padding, groups, precision):
    return lax.conv_general_dilated(
        x, kernel, (stride,) * 2, [(padding, padding)] * 2, rhs_dilation=(dilation,) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision)


def _chunk_kernel_grad(x, g, shape, stride, dilation, padding, groups, precision):
    """The kernel gradient as one matrix product per tap: `sum_{b,h,w} x_tap g`."""
    out_h, out_w = g.shape[1], g.shape[2]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    xg = xp.reshape(*xp.shape[:3], groups, -1)
    gg = g.reshape(*g.shape[:3], groups, -1)

    def tap(i: int, j: int) -> jax.Array:
        rows = slice(i * dilation, i * dilation + (out_h - 1) * stride + 1, stride)
        cols = slice(j * dilation, j * dilation + (out_w - 1) * stride + 1, stride)
        grad = jnp.einsum("bhwgc,bhwgo->cgo", xg[:, rows, cols], gg, precision=precision)
        return grad.reshape(grad.shape[0], -1)

    return jnp.stack([tap(i, j) for i in range(shape[0]) for j in range(shape[1])]
                     ).reshape(shape)


# Output-gradient elements per step of the kernel gradient's loop over the batch (the largest
# divisor of the batch within it), so that the nine taps re-read x and g from cache. Measured on
# CPU at 8x56x56, 32 -> 64 channels: 1.6x faster than the taps over the whole batch at once.
_KERNEL_GRAD_CHUNK_ELEMENTS = 2**19


def _kernel_grad(x, g, shape, stride, dilation, padding, groups, precision):
    """`_chunk_kernel_grad` summed over chunks of the batch, in float32 (at least)."""
    chunk = images_per_step(g.shape, _KERNEL_GRAD_CHUNK_ELEMENTS)
    dtype = jnp.promote_types(x.dtype, jnp.float32)

    def step(i, total):
        chunks = [lax.dynamic_slice_in_dim(a, i * chunk, chunk) for a in (x, g)]
        grad = _chunk_kernel_grad(*chunks, shape, stride, dilation, padding, groups, precision)
        return total + grad.astype(dtype)

    # Slices of x and g taken inside the loop, not `lax.scan` over `[steps, chunk, ...]` views:
    # scan's inputs are copied into the loop's buffers, and with them XLA also computed g
    # (the BatchNorm/ReLU backward of SelectiveKernel) a second time for the copy.
    return lax.fori_loop(0, x.shape[0] // chunk, step, jnp.zeros(shape, dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _tap_grad_conv(x, kernel, stride, dilation, padding, groups, precision):
    return _conv(x, kernel, stride, dilation, padding, groups, precision)


def _tap_grad_conv_fwd(x, kernel, stride, dilation, padding, groups, precision):
    return _conv(x, kernel, stride, dilation, padding, groups, precision), (x, kernel)


def _tap_grad_conv_bwd(stride, dilation, padding, groups, precision, residuals, g):
    x, kernel = residuals
    _, x_vjp = jax.vjp(lambda x: _conv(x, kernel, stride, dilation, padding, groups, precision),
                       x)
    kernel_grad = _kernel_grad(x, g, kernel.shape, stride, dilation, padding, groups, precision)
    return x_vjp(g)[0], kernel_grad.astype(kernel.dtype)


_tap_grad_conv.defvjp(_tap_grad_conv_fwd, _tap_grad_conv_bwd)


def branch_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1,
                padding: int = 0, groups: int = 1, precision: lax.PrecisionLike = None,
                implementation: str | None = None) -> jax.Array:
    """A path's convolution: torch's `Conv2d` (symmetric padding, no bias) in NHWC.

    `implementation="xla"` is plain `lax.conv_general_dilated`, differentiated by XLA; None is
    what is proven best on the platform: on the CPU (`benchmarks/selective_kernel.py`), the same
    convolution whose kernel gradient is one matrix product per tap (a custom VJP), since XLA's
    kernel-gradient convolution there is four to eight times slower than the forward pass; XLA
    elsewhere. Both give the same values and gradients.

    Args:
      x: `[B, H, W, C]`.
      kernel: `[Kh, Kw, C / groups, O]`, O divisible by groups.
      stride, dilation, padding, groups: as torch's `Conv2d` (integers: stride, dilation and
        groups >= 1, padding >= 0).
      precision: of the convolutions and matrix products.
      implementation: None or "xla" (the library's one vocabulary; see `kernels._common`).

    Returns:
      `[B, H', W', O]`, H' = (H + 2 padding - dilation (Kh - 1) - 1) // stride + 1, likewise W'.

    Raises:
      ValueError: wrong ranks, an empty x or kernel, channels that disagree with groups, bad
        settings, or an output of no positions (x smaller than the dilated kernel).
    """
    x, kernel = map(as_float, (x, kernel))
    check_rank("x", x, 4, "[B, H, W, C]")
    check_rank("kernel", kernel, 4, "[Kh, Kw, C / groups, O]")
    check_nonempty("x", x, "[B, H, W, C]")
    check_nonempty("kernel", kernel, "[Kh, Kw, C / groups, O]")
    for name, value, minimum in (("stride", stride, 1), ("dilation", dilation, 1),
                                 ("padding", padding, 0), ("groups", groups, 1)):
        check_positive(name, value, minimum)
    check_same(("x", "kernel"), (x.shape[-1], kernel.shape[2] * groups),
               "input channels (x[-1], kernel[2] * groups)", (x.shape, kernel.shape))
    check_divisible("kernel output channels", kernel.shape[3], groups, "groups")
    out_hw = tuple((n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
                   for n, k in zip(x.shape[1:3], kernel.shape[:2], strict=True))
    if min(out_hw) < 1:
        raise ValueError(f"x {tuple(x.shape)} is too small for kernel {tuple(kernel.shape)} "
                         f"with padding {padding} and dilation {dilation}: the output would "
                         f"be {out_hw}")
    check_implementation("branch_conv", implementation, (None, "xla"))
    if implementation is None and jax.default_backend() == "cpu":
        return _tap_grad_conv(x, kernel, stride, dilation, padding, groups, precision)
    return _conv(x, kernel, stride, dilation, padding, groups, precision)
