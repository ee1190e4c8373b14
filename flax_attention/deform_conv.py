"""Deformable convolution as a Flax module: torchvision's `DeformConv2d` and mmcv's
`DeformConv2dPack` / `ModulatedDeformConv2dPack`.

Dai et al.: "Deformable Convolutional Networks", ICCV 2017 (arXiv:1703.06211); Zhu et al.:
"Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019 (arXiv:1811.11168). The
math is `flax_attention.functional.deform_conv.deform_conv2d` (torchvision's
`ops.deform_conv2d` in NHWC); `from_torch` loads torchvision's state dicts (`weight`, `bias`)
and mmcv's (with `conv_offset.weight`, `conv_offset.bias`) into the Flax `kernel`, `bias` and
`conv_offset`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention._checks import check_divisible, check_image
from flax_attention.functional.deform_conv import (
    Pair,
    _output_hw,
    _pair,
    deform_conv2d,
    deform_conv2d_points,
)
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    conv_kernel,
    in_channels,
    param,
    register,
)
from flax_attention.layers import TORCH_KERNEL, torch_linear_bias

__all__ = ["DeformConv2d"]


class DeformConv2d(nn.Module):
    """A deformable convolution, with its own offset convolution or with offsets passed in.

    Two ways to call it; by default (`offset_conv=None`) the call decides:

    - `module(x)` (mmcv's `DeformConv2dPack`; with `modulated=True`, its
      `ModulatedDeformConv2dPack`, DCNv2). The offsets come from `conv_offset`, a convolution of
      x with the module's kernel size, stride, padding and dilation (one group, with bias),
      initialised to zero so that a fresh module is a plain convolution. Its 2 * G * kh * kw
      output channels are the offsets; when `modulated`, it has G * kh * kw more whose sigmoid
      is the mask (mmcv: `o1, o2, mask = chunk(3)`, offset = `cat(o1, o2)`).
    - `module(x, offset, mask=None)` (torchvision's `DeformConv2d`), with offsets (and an
      optional DCNv2 mask) computed elsewhere, in `deform_conv2d`'s layouts; G is read from the
      offset. The module then has only `kernel` and `bias` (no `conv_offset`).

    `offset_conv=True` or False pins one form (a call in the other raises a ValueError).
    `from_torch` reads `offset_conv=None` as the first form (mmcv's keys, `conv_offset.*`); load
    torchvision's `{weight, bias}` with `offset_conv=False`.

    The sampling locations `[B, Ho * Wo, G * kh * kw, 2]` (normalised (x, y), see
    `deform_conv2d_points`) are sown as ("intermediates", "attention").

    Initialisation: torchvision's (`DeformConv2d.reset_parameters`): the kernel
    `kaiming_uniform_(a=sqrt(5))` (`TORCH_KERNEL`, U(+-1 / sqrt(fan_in))) and the bias
    U(+-1 / sqrt(fan_in)), fan_in = C / groups * kh * kw; `conv_offset` zero (mmcv's). mmcv's
    main convolutions start otherwise (DCNv1: `kaiming_uniform_(nonlinearity="relu")`; DCNv2:
    U(+-1 / sqrt(C * kh * kw)) and a zero bias): pass `kernel_init`/`bias_init` for those.

    Differences from the references: NHWC; the kernel is Flax's HWIO (`kernel`, torch's
    `weight`); mmcv's fallback that pads inputs smaller than the kernel is left out (such inputs
    raise a ValueError).

    Attributes:
      features: output channels O (divisible by `groups`).
      kernel_size: (kh, kw) or one int.
      strides, padding, dilation: (height, width) pairs or one int each (zero padding).
      groups: of the convolution (divides the input channels).
      offset_groups: G, the offset groups of `conv_offset` (divides the input channels).
      use_bias: the convolution has a bias (torchvision and mmcv's DCNv2 do; mmcv's DCNv1 not).
      modulated: `conv_offset` also predicts the DCNv2 mask (only in the `module(x)` form).
      offset_conv: None: `conv_offset` predicts the offsets unless the call passes them; True:
        always (`module(x)` only); False: never (`module(x, offset, mask=None)` only).
      kernel_init: of the `[kh, kw, C / groups, O]` kernel (default torchvision's).
      bias_init: of the bias; None: torchvision's U(+-1 / sqrt(fan_in)).
    """

    features: int
    kernel_size: Pair = 3
    strides: Pair = 1
    padding: Pair = 0
    dilation: Pair = 1
    groups: int = 1
    offset_groups: int = 1
    use_bias: bool = True
    modulated: bool = False
    offset_conv: bool | None = None
    kernel_init: nn.initializers.Initializer = TORCH_KERNEL
    bias_init: nn.initializers.Initializer | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _check_call(self, x: jax.Array, offset: jax.Array | None, mask: jax.Array | None) -> bool:
        """Checks x and the call's form against the fields; returns whether `conv_offset`
        predicts the offsets."""
        check_image("x", x)
        check_divisible("x channels", x.shape[-1], self.groups, "groups")
        check_divisible("features", self.features, self.groups, "groups")
        if self.modulated and self.offset_conv is False:
            raise ValueError("modulated=True needs conv_offset (offset_conv=None or True); with "
                             "offset_conv=False the mask is an argument of the call")
        if offset is None and mask is not None:
            raise ValueError("mask was passed without offset: call module(x, offset, mask) "
                             "(torchvision's form)")
        if offset is None and self.offset_conv is False:
            raise ValueError("offset is required with offset_conv=False: call module(x, offset,"
                             " mask=None)")
        if offset is not None and self.offset_conv:
            raise ValueError("offset was passed but offset_conv=True: conv_offset predicts the "
                             "offsets (call module(x)); pass offset with offset_conv=None or "
                             "False (torchvision's form)")
        if offset is not None and self.modulated:
            raise ValueError("offset was passed but modulated=True: conv_offset predicts the "
                             "offsets and the mask (call module(x)); to pass them, use "
                             "modulated=False and module(x, offset, mask)")
        if offset is None:
            check_divisible("x channels", x.shape[-1], self.offset_groups, "offset_groups")
        return offset is None

    def _predict_offset(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """mmcv's `conv_offset`: offsets `[B, Ho, Wo, 2 * G * K]` and, when modulated, the mask
        `[B, Ho, Wo, G * K]` (float32 sigmoid)."""
        kh, kw = _pair("kernel_size", self.kernel_size, 1)
        taps = self.offset_groups * kh * kw
        out = nn.Conv(taps * (3 if self.modulated else 2), (kh, kw), self.strides,
                      [(p, p) for p in _pair("padding", self.padding, 0)],
                      kernel_dilation=self.dilation, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                      name="conv_offset")(x)
        if not self.modulated:
            return out, None
        return out[..., :2 * taps], jax.nn.sigmoid(out[..., 2 * taps:].astype(jnp.float32))

    @nn.compact
    def __call__(self, x: jax.Array, offset: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """`[B, H, W, C]`, and in torchvision's form the offset `[B, Ho, Wo, 2 * G * kh * kw]`
        and an optional mask `[B, Ho, Wo, G * kh * kw]` -> `[B, Ho, Wo, features]`."""
        predict = self._check_call(x, offset, mask)
        kh, kw = _pair("kernel_size", self.kernel_size, 1)
        per_group = x.shape[-1] // self.groups
        kernel = self.param("kernel", self.kernel_init, (kh, kw, per_group, self.features),
                            self.param_dtype)
        bias_init = self.bias_init or torch_linear_bias(per_group * kh * kw)
        bias = (self.param("bias", bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if predict:
            offset, mask = self._predict_offset(x)
        settings = {"stride": self.strides, "padding": self.padding, "dilation": self.dilation}
        self.sow("intermediates", "attention",
                 deform_conv2d_points(offset, x.shape[1:3], (kh, kw), **settings))
        return deform_conv2d(x, offset, kernel, bias, mask=mask, precision=self.precision,
                             **settings)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# torchvision's DeformConv2d: `weight` [O, C / groups, kh, kw], `bias`; mmcv's Packs add
# `conv_offset.weight`, `conv_offset.bias` (DeformConv2dPack has no `bias`). `offset_conv=None`
# converts as a Pack (the parameters of `module(x)`); torchvision's keys need False.


def _rules(module: DeformConv2d) -> Rules:
    rules = param(("kernel",), "weight", conv_kernel)
    if module.use_bias:
        rules |= param(("bias",), "bias")
    if module.offset_conv is not False:
        rules |= conv(("conv_offset",), "conv_offset")
    return rules


def _example_inputs(module: DeformConv2d, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct, ...]:
    """x of the weight's channels, as large as the dilated kernel; with `offset_conv=False`
    an offset (one offset group) of the output's size too."""
    kernel_hw = _pair("kernel_size", module.kernel_size, 1)
    dilation = _pair("dilation", module.dilation, 1)
    side = max(d * (k - 1) + 1 for d, k in zip(dilation, kernel_hw, strict=True))
    channels = in_channels(shapes, "weight") * module.groups
    x = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
    if module.offset_conv is not False:
        return (x,)
    out_hw = _output_hw((side, side), kernel_hw, _pair("strides", module.strides, 1),
                        _pair("padding", module.padding, 0), dilation)
    offset = (1, *out_hw, 2 * kernel_hw[0] * kernel_hw[1])
    return x, jax.ShapeDtypeStruct(offset, jnp.float32)


register(DeformConv2d)(Converter(_rules, _example_inputs))
