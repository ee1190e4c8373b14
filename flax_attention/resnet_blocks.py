"""The residual blocks of ResNet and ResNeXt, with a hook for a per-block attention module.

He, Zhang, Ren, Sun: "Deep Residual Learning for Image Recognition", CVPR 2016, in torchvision's
form (v1.5: the stride of a bottleneck is on its 3x3 convolution). The attention hook is where
SE-ResNet puts its SE layer (`flax_attention.squeeze_excitation.SEBasicBlock`, `SEBottleneck`).
Parameter names follow torchvision (`conv1`, `bn1`, ..., `downsample`) and senet.pytorch (`se`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_image
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    conv_bn,
    image_input,
    nested,
    register,
    rules_for,
)

__all__ = ["AttentionFactory", "BasicBlock", "Bottleneck", "ResidualBlock"]

# The factory of a block's attention: called as `attention(dtype=, param_dtype=, precision=,
# name="se")` and applied to `[B, H, W, C]`, e.g. `functools.partial(SELayer, reduction=16)`.
AttentionFactory = Callable[..., nn.Module]



def call_attention(attention: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    """`attention(x, train)` if its `__call__` takes `train` (it has BatchNorm), else
    `attention(x)`."""
    if "train" in inspect.signature(type(attention).__call__).parameters:
        return attention(x, train)
    return attention(x)


def avg_down_pool(x: jax.Array, stride: int) -> jax.Array:
    """The pool of timm's avg-pool shortcut (`downsample_avg`, the "d" ResNets):
    `AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`, the identity at stride 1.

    Args:
      x: `[B, H, W, C]`.
      stride: of the pool.

    Returns:
      `[B, H', W', C]`, H' = ceil((H - 2) / stride) + 1 (H' = 1 for H = 1), likewise W'; a
      window cut by the border averages its pixels inside.
    """
    if stride == 1:
        return x
    pads = [(0, max(-(-(n - 2) // stride) * stride + 2 - n, 0)) for n in x.shape[1:3]]
    return nn.avg_pool(x, (2, 2), (stride, stride), pads, count_include_pad=False)


class ResidualBlock(nn.Module):
    """What the basic and bottleneck blocks share: torchvision's conv/BN names, the attention
    hook `se` after the last BN, and the shortcut (`downsample`: 1x1 conv with the block's
    stride, then BN, when the stride is not 1 or the channels change; with `avg_down`, timm's
    "d" shortcut: `avg_down_pool` with the block's stride, then 1x1 conv and BN, keys
    `downsample.1`, `downsample.2`). An attention whose `__call__` takes `train` (one with
    BatchNorm, e.g. CBAM) is given the block's. `zero_init_last`: the last BN's scale starts
    at zero, so that a fresh block is its shortcut (timm's `zero_init_last`, torchvision's
    `zero_init_residual`)."""

    planes: int
    stride: int = 1
    dilation: int = 1
    first_dilation: int | None = None
    groups: int = 1
    base_width: int = 64
    attention: AttentionFactory | None = None
    use_downsample: bool | None = None
    avg_down: bool = False
    zero_init_last: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    expansion: ClassVar[int] = 1
    num_convs: ClassVar[int] = 2

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    @property
    def entry_dilation(self) -> int:
        """The dilation of the block's first 3x3 convolution: `first_dilation`, or `dilation`."""
        return self.dilation if self.first_dilation is None else self.first_dilation

    def _check(self, x: jax.Array) -> bool:
        """Checks `x` and the fields; returns whether the shortcut is projected."""
        check_image("x", x)
        for name in ("planes", "stride", "dilation", "groups", "base_width", "first_dilation"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
              dilation: int = 1, groups: int = 1) -> nn.Conv:
        pad = dilation * (kernel - 1) // 2
        return nn.Conv(features, (kernel, kernel), strides=stride, padding=[(pad, pad)] * 2,
                       kernel_dilation=dilation, feature_group_count=groups, use_bias=False,
                       name=f"conv{index}", **layers.numerics(self))

    def _bn(self, index: int, train: bool) -> nn.BatchNorm:
        last = self.zero_init_last and index == self.num_convs
        return layers.batch_norm(train, self.dtype, self.param_dtype, name=f"bn{index}",
                                 scale_init=nn.initializers.zeros if last else
                                 nn.initializers.ones)

    def _conv_bn(self, index: int, x: jax.Array, train: bool, features: int, kernel: int,
                 **conv_kwargs: int) -> jax.Array:
        return self._bn(index, train)(self._conv(index, features, kernel, **conv_kwargs)(x))

    @nn.nowrap
    def attention_module(self) -> nn.Module | None:
        """The block's attention module (named `se`), or None; `nowrap`, so that it can also be
        built outside `__call__` (the torch converter reads its type and fields)."""
        if self.attention is None:
            return None
        return self.attention(name="se", **layers.numerics(self))

    def _attend_and_add(self, x: jax.Array, out: jax.Array, downsample: bool,
                        train: bool) -> jax.Array:
        """`relu(attention(out) + shortcut(x))`."""
        attention = self.attention_module()
        if attention is not None:
            out = call_attention(attention, out, train)
        if downsample:
            stride = self.stride
            if self.avg_down:
                x, stride = avg_down_pool(x, self.stride), 1
            x = layers.ConvBN(self.out_channels, kernel_size=1, strides=stride,
                              activation=None, name="downsample", **layers.numerics(self))(x, train)
        return nn.relu(out + x)


class BasicBlock(ResidualBlock):
    """The ResNet-18/34 block (torchvision's `BasicBlock`, expansion 1), with an optional
    attention hook (SE-ResNet-18/34's `SEBasicBlock` with `attention=SELayer`).

    conv3x3(stride)-BN-ReLU, conv3x3-BN, attention, plus the shortcut, ReLU.

    Differences from torchvision: dilation > 1 is allowed (torchvision refuses it), as in timm's
    `BasicBlock`: the first 3x3 convolution takes `first_dilation`, the second `dilation`; the
    projection is decided from the input (or forced by `use_downsample`) instead of being
    passed in as a module.

    Attributes:
      planes: output channels.
      stride: of the first convolution and of the projection.
      dilation: of the second 3x3 convolution, and of the first unless `first_dilation` is set.
      first_dilation: of the first 3x3 convolution (timm's `first_dilation`: the first block of
        a dilated stage keeps the previous stage's dilation there); None: `dilation`.
      groups, base_width: must be 1 and 64 (present so that `ResNet` can build any block alike).
      attention: factory of the module applied after the last BN (named `se`); None for none.
      use_downsample: force (True) or forbid (False) the projection; None decides from the input.
        `from_torch` needs it set when stride is 1, since it cannot see the input channels.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, planes]` (sizes rounded up)."""
        downsample = self._check(x)
        if self.groups != 1 or self.base_width != 64:
            raise ValueError(
                f"BasicBlock needs groups=1 and base_width=64, got {self.groups}, {self.base_width}"
            )
        out = nn.relu(self._conv_bn(1, x, train, self.planes, 3, stride=self.stride,
                                    dilation=self.entry_dilation))
        out = self._conv_bn(2, out, train, self.planes, 3, dilation=self.dilation)
        return self._attend_and_add(x, out, downsample, train)


class Bottleneck(ResidualBlock):
    """The ResNet-50/101/152 and ResNeXt block (torchvision's `Bottleneck`, v1.5, expansion 4),
    with an optional attention hook (SE-ResNet's `SEBottleneck` with `attention=SELayer`).

    conv1x1-BN-ReLU, grouped conv3x3(stride, dilation)-BN-ReLU, conv1x1-BN, attention, plus the
    shortcut, ReLU. The inner width is `int(planes * base_width / 64) * groups`.

    Differences from torchvision: the projection is decided as in `BasicBlock`.

    Attributes:
      planes: the block outputs 4 * planes channels.
      stride: of the 3x3 convolution and of the projection.
      dilation, first_dilation: of the 3x3 convolution, `first_dilation` when set (timm's
        `Bottleneck`; torchvision passes the first block of a dilated stage the previous
        stage's dilation, which `ResNet` does as `first_dilation`).
      groups: of the 3x3 convolution.
      base_width: width per group at planes = 64.
      attention, use_downsample: as in `BasicBlock`.
    """

    expansion: ClassVar[int] = 4
    num_convs: ClassVar[int] = 3

    @property
    def width(self) -> int:
        return int(self.planes * (self.base_width / 64.0)) * self.groups

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, 4 * planes]` (sizes rounded up)."""
        downsample = self._check(x)
        if self.width < 1:
            raise ValueError(
                f"the width int(planes * base_width / 64) * groups must be >= 1, got {self.width}"
            )
        out = nn.relu(self._conv_bn(1, x, train, self.width, 1))
        out = nn.relu(self._conv_bn(2, out, train, self.width, 3, stride=self.stride,
                                    dilation=self.entry_dilation, groups=self.groups))
        out = self._conv_bn(3, out, train, self.out_channels, 1)
        return self._attend_and_add(x, out, downsample, train)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are torchvision's ResNet names (`conv1`, `bn1`, `layer<k>.<n>.{conv1,bn1,...}`,
# `layer<k>.<n>.downsample.{0,1}`, `fc`), with moskomule/senet.pytorch's `se.fc.*` inside the blocks
# of SE-ResNets.

def _has_downsample(module: ResidualBlock) -> bool:
    if module.use_downsample is not None:
        return module.use_downsample
    if module.stride != 1:
        return True
    raise ValueError(
        f"from_torch cannot tell whether {type(module).__name__}(stride=1) has a `downsample` "
        "projection before seeing the input channels: set use_downsample=True or False"
    )


def _block_rules(module: ResidualBlock) -> Rules:
    rules: Rules = {}
    for index in range(1, module.num_convs + 1):
        rules |= conv((f"conv{index}",), f"conv{index}", bias=False)
        rules |= batch_norm((f"bn{index}",), f"bn{index}")
    return rules | hook_rules(module)


def hook_rules(module: ResidualBlock) -> Rules:
    """The rules of a block's attention (`se`) and shortcut (`downsample`), for the converters
    of other `ResidualBlock`s."""
    rules: Rules = {}
    attention = module.attention_module()
    if attention is not None:
        rules |= nested(rules_for(attention), ("se",), "se")
    if _has_downsample(module):
        rules |= conv_bn(("downsample",), "downsample") if not module.avg_down else (
            conv(("downsample", "conv"), "downsample.1", bias=False)
            | batch_norm(("downsample", "bn"), "downsample.2"))
    return rules


def _block_inputs(module: ResidualBlock, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "conv1.weight", side=8)


register(ResidualBlock)(Converter(_block_rules, _block_inputs))


