"""Squeeze-and-Excitation: the SE layer and the SE residual blocks of SE-ResNet / SE-ResNeXt.

Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018; reference code
moskomule/senet.pytorch (`senet/se_module.py`, `senet/se_resnet.py`), whose blocks follow
torchvision's ResNet. NHWC here, NCHW there; parameter names follow the reference so
`flax_attention.interop.torch.from_torch` imports its state dicts.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_divisible, check_rank
from flax_attention.functional import squeeze_excitation_ops as F

__all__ = ["SELayer", "SEBasicBlock", "SEBottleneck"]


class SELayer(nn.Module):
    """The squeeze-and-excitation layer (the reference's `SELayer`).

    Global average pool over every spatial axis, `fc_0` (C -> C / reduction, no bias), ReLU,
    `fc_2` (C / reduction -> C, no bias), sigmoid, and each channel scaled by its gate. Works on
    `[B, L, C]`, `[B, H, W, C]` and `[B, T, H, W, C]`. The `[B, C]` gates are sown as
    ("intermediates", "attention").

    Differences from the reference: channels must be divisible by `reduction` (the reference
    floors C / reduction); the gates are computed in float32 under bfloat16.

    Attributes:
      reduction: the hidden layer has C / reduction units.
    """

    reduction: int = 16
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, *S, C]` -> `[B, *S, C]`."""
        F.check_spatial_input("x", x)
        channels = x.shape[-1]
        check_divisible("x channels", channels, self.reduction, "reduction")
        init = nn.initializers.lecun_normal()
        hidden = channels // self.reduction
        w1 = self.param("fc_0", init, (channels, hidden), self.param_dtype)
        w2 = self.param("fc_2", init, (hidden, channels), self.param_dtype)
        x, w1, w2 = promote_dtype(x, w1, w2, dtype=self.dtype)
        gates = F.squeeze_excitation_gates(x, w1, w2, self.precision)
        self.sow("intermediates", "attention", gates)
        return F.excite(x, gates)


class _SEResidualBlock(nn.Module):
    """What the SE basic and bottleneck blocks share: convs and norms named like torchvision's
    (`conv1`, `bn1`, ...), the SE layer `se` after the last norm, and the shortcut."""

    planes: int
    stride: int = 1
    reduction: int = 16
    use_downsample: bool | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    expansion: ClassVar[int] = 1

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    def _check(self, x: jax.Array) -> bool:
        """Checks `x` and the fields; returns whether the shortcut is projected."""
        check_rank("x", x, 4, "[B, H, W, C]")
        if self.planes < 1 or self.stride < 1:
            raise ValueError(f"planes and stride must be >= 1, got {self.planes}, {self.stride}")
        check_divisible("planes * expansion", self.out_channels, self.reduction, "reduction")
        needed = self.stride != 1 or x.shape[-1] != self.out_channels
        if self.use_downsample is None:
            return needed
        if needed and not self.use_downsample:
            raise ValueError(
                f"use_downsample=False needs stride 1 and x channels == planes * expansion "
                f"({self.out_channels}); got stride {self.stride}, x shape {tuple(x.shape)}"
            )
        return self.use_downsample

    def _conv(self, index: int, features: int, kernel: int, stride: int = 1,
              groups: int = 1) -> nn.Conv:
        pad = (kernel - 1) // 2
        return nn.Conv(features, (kernel, kernel), strides=stride, padding=[(pad, pad)] * 2,
                       feature_group_count=groups, use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, precision=self.precision,
                       name=f"conv{index}")

    def _bn(self, index: int, train: bool) -> nn.BatchNorm:
        return layers.batch_norm(train, self.dtype, self.param_dtype, name=f"bn{index}")

    def _excite_and_add(self, x: jax.Array, out: jax.Array, downsample: bool,
                        train: bool) -> jax.Array:
        """`relu(se(out) + shortcut(x))`."""
        out = SELayer(self.reduction, self.dtype, self.param_dtype, self.precision,
                      name="se")(out)
        if downsample:
            x = layers.ConvBN(self.out_channels, kernel_size=1, strides=self.stride,
                              activation=None, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="downsample")(x, train)
        return nn.relu(out + x)


class SEBasicBlock(_SEResidualBlock):
    """The SE-ResNet basic block (the reference's `SEBasicBlock`, expansion 1).

    conv3x3(stride)-BN-ReLU, conv3x3-BN, SE, plus the shortcut, ReLU. The shortcut is projected
    by `downsample` (1x1 conv with the block's stride, no bias, then BN) when the stride is not 1
    or the input channels differ from `planes`, as torchvision's ResNet builds it.

    Differences from the reference: the projection is decided from the input (or forced by
    `use_downsample`) instead of being passed in as a module; `planes` must be divisible by
    `reduction`.

    Attributes:
      planes: output channels.
      stride: of the first convolution and of the projection.
      reduction: of the SE layer.
      use_downsample: force (True) or forbid (False) the projection; None decides from the input.
        `from_torch` needs it set when stride is 1, since it cannot see the input channels.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, planes]` (sizes rounded up)."""
        downsample = self._check(x)
        out = nn.relu(self._bn(1, train)(self._conv(1, self.planes, 3, self.stride)(x)))
        out = self._bn(2, train)(self._conv(2, self.planes, 3)(out))
        return self._excite_and_add(x, out, downsample, train)


class SEBottleneck(_SEResidualBlock):
    """The SE-ResNet / SE-ResNeXt bottleneck block (the reference's `SEBottleneck`, expansion 4).

    conv1x1-BN-ReLU, grouped conv3x3(stride)-BN-ReLU, conv1x1-BN, SE, plus the shortcut, ReLU.
    The inner width is `int(planes * base_width / 64) * groups`, as in torchvision's Bottleneck,
    so `groups=32, base_width=4` gives the SE-ResNeXt-50 (32x4d) block; the defaults give
    SE-ResNet's (the reference's block has no groups). The shortcut is projected as in
    `SEBasicBlock`.

    Differences from the reference: as `SEBasicBlock`; `groups` and `base_width` are added.

    Attributes:
      planes: the block outputs 4 * planes channels.
      stride: of the 3x3 convolution and of the projection.
      reduction: of the SE layer (applied to 4 * planes channels).
      groups: of the 3x3 convolution.
      base_width: width per group at planes = 64.
      use_downsample: as in `SEBasicBlock`.
    """

    groups: int = 1
    base_width: int = 64

    expansion: ClassVar[int] = 4

    @property
    def width(self) -> int:
        return int(self.planes * (self.base_width / 64.0)) * self.groups

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, 4 * planes]` (sizes rounded up)."""
        downsample = self._check(x)
        if self.groups < 1 or self.width < 1:
            raise ValueError(
                f"groups ({self.groups}) and the width int(planes * base_width / 64) * groups "
                f"({self.width}) must be >= 1"
            )
        out = nn.relu(self._bn(1, train)(self._conv(1, self.width, 1)(x)))
        conv2 = self._conv(2, self.width, 3, self.stride, self.groups)
        out = nn.relu(self._bn(2, train)(conv2(out)))
        out = self._bn(3, train)(self._conv(3, self.out_channels, 1)(out))
        return self._excite_and_add(x, out, downsample, train)
