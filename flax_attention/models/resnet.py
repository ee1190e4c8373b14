"""ResNet, SE-ResNet and SE-ResNeXt as whole networks (classifiers or dilated backbones).

He, Zhang, Ren, Sun: "Deep Residual Learning for Image Recognition", CVPR 2016, in torchvision's
form (v1.5: the stride of a bottleneck is on its 3x3 convolution; `replace_stride_with_dilation`
for output stride 16 or 8); Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018, with
moskomule/senet.pytorch's SE-ResNets (the SE layer `se` after each block's last BatchNorm,
before the residual add). Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`,
..., `fc`; `se.fc.*` inside SE blocks) so `flax_attention.interop.torch.from_torch` imports their
state dicts; Flax names the blocks `layer1_0`, ... NHWC here, NCHW there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_rank
from flax_attention.squeeze_excitation import SELayer

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "se_resnet18",
    "se_resnet34",
    "se_resnet50",
    "se_resnet101",
    "se_resnet152",
    "se_resnext50_32x4d",
]

# The factory of a block's attention: called as `attention(dtype=, param_dtype=, precision=,
# name="se")` and applied to `[B, H, W, C]`, e.g. `functools.partial(SELayer, reduction=16)`.
AttentionFactory = Callable[..., nn.Module]

_STEM_FEATURES = 64


class _ResidualBlock(nn.Module):
    """What the basic and bottleneck blocks share: torchvision's conv/BN names, the attention
    hook `se` after the last BN, and the shortcut (`downsample`: 1x1 conv with the block's
    stride, then BN, when the stride is not 1 or the channels change)."""

    planes: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    base_width: int = 64
    attention: AttentionFactory | None = None
    use_downsample: bool | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    expansion: ClassVar[int] = 1
    num_convs: ClassVar[int] = 2

    @property
    def out_channels(self) -> int:
        return self.planes * self.expansion

    def _check(self, x: jax.Array) -> bool:
        """Checks `x` and the fields; returns whether the shortcut is projected."""
        check_rank("x", x, 4, "[B, H, W, C]")
        for name in ("planes", "stride", "dilation", "groups", "base_width"):
            if getattr(self, name) < 1:
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
                       dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                       name=f"conv{index}")

    def _bn(self, index: int, train: bool) -> nn.BatchNorm:
        return layers.batch_norm(train, self.dtype, self.param_dtype, name=f"bn{index}")

    def _conv_bn(self, index: int, x: jax.Array, train: bool, features: int, kernel: int,
                 **conv_kwargs: int) -> jax.Array:
        return self._bn(index, train)(self._conv(index, features, kernel, **conv_kwargs)(x))

    def _attend_and_add(self, x: jax.Array, out: jax.Array, downsample: bool,
                        train: bool) -> jax.Array:
        """`relu(attention(out) + shortcut(x))`."""
        if self.attention is not None:
            out = self.attention(dtype=self.dtype, param_dtype=self.param_dtype,
                                 precision=self.precision, name="se")(out)
        if downsample:
            x = layers.ConvBN(self.out_channels, kernel_size=1, strides=self.stride,
                              activation=None, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="downsample")(x, train)
        return nn.relu(out + x)


class BasicBlock(_ResidualBlock):
    """The ResNet-18/34 block (torchvision's `BasicBlock`, expansion 1), with an optional
    attention hook (SE-ResNet-18/34's `SEBasicBlock` with `attention=SELayer`).

    conv3x3(stride)-BN-ReLU, conv3x3-BN, attention, plus the shortcut, ReLU.

    Differences from torchvision: dilation > 1 is allowed (torchvision refuses it) and dilates
    both 3x3 convolutions; the projection is decided from the input (or forced by
    `use_downsample`) instead of being passed in as a module.

    Attributes:
      planes: output channels.
      stride: of the first convolution and of the projection.
      dilation: of both 3x3 convolutions.
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
        d = self.dilation
        out = nn.relu(self._conv_bn(1, x, train, self.planes, 3, stride=self.stride, dilation=d))
        out = self._conv_bn(2, out, train, self.planes, 3, dilation=d)
        return self._attend_and_add(x, out, downsample, train)


class Bottleneck(_ResidualBlock):
    """The ResNet-50/101/152 and ResNeXt block (torchvision's `Bottleneck`, v1.5, expansion 4),
    with an optional attention hook (SE-ResNet's `SEBottleneck` with `attention=SELayer`).

    conv1x1-BN-ReLU, grouped conv3x3(stride, dilation)-BN-ReLU, conv1x1-BN, attention, plus the
    shortcut, ReLU. The inner width is `int(planes * base_width / 64) * groups`.

    Differences from torchvision: the projection is decided as in `BasicBlock`.

    Attributes:
      planes: the block outputs 4 * planes channels.
      stride: of the 3x3 convolution and of the projection.
      dilation: of the 3x3 convolution.
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
            raise ValueError(f"the width int(planes * base_width / 64) * groups is {self.width}")
        out = nn.relu(self._conv_bn(1, x, train, self.width, 1))
        out = nn.relu(self._conv_bn(2, out, train, self.width, 3, stride=self.stride,
                                    dilation=self.dilation, groups=self.groups))
        out = self._conv_bn(3, out, train, self.out_channels, 1)
        return self._attend_and_add(x, out, downsample, train)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Block `index` of stage `stage` (e.g. "layer1") of a `ResNet`, and its constructor
    arguments."""

    stage: str
    index: int
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        """The Flax submodule name, e.g. "layer1_0"."""
        return f"{self.stage}_{self.index}"

    @property
    def torch_prefix(self) -> str:
        """The torchvision prefix, e.g. "layer1.0"."""
        return f"{self.stage}.{self.index}"


def block_specs(net: ResNet) -> list[BlockSpec]:
    """The blocks of `net` in order, as torchvision's `_make_layer` builds them.

    Stage k (from 0) has `stage_sizes[k]` blocks of `64 * 2**k` planes; stages after the first
    halve the resolution in their first block, unless `replace_stride_with_dilation[k - 1]`
    multiplies the dilation by 2 instead (the first block of that stage keeps the previous one).

    Raises:
      ValueError: if `stage_sizes` or `replace_stride_with_dilation` do not fit.
    """
    sizes, dilate = tuple(net.stage_sizes), tuple(net.replace_stride_with_dilation)
    if not sizes or min(sizes) < 1 or len(dilate) != len(sizes) - 1:
        raise ValueError(
            f"stage_sizes must be positive and replace_stride_with_dilation one shorter; got "
            f"stage_sizes {sizes}, replace_stride_with_dilation {dilate}"
        )
    specs, in_channels, dilation = [], _STEM_FEATURES, 1
    for k, size in enumerate(sizes):
        planes, stride, previous = _STEM_FEATURES * 2**k, 1 if k == 0 else 2, dilation
        if k and dilate[k - 1]:
            dilation, stride = dilation * stride, 1
        for n in range(size):
            first = n == 0
            out_channels = planes * net.block_cls.expansion
            kwargs = dict(
                planes=planes, stride=stride if first else 1,
                dilation=previous if first else dilation, groups=net.groups,
                base_width=net.width_per_group, attention=net.attention,
                use_downsample=first and (stride != 1 or in_channels != out_channels),
                dtype=net.dtype, param_dtype=net.param_dtype, precision=net.precision,
            )
            specs.append(BlockSpec(f"layer{k + 1}", n, kwargs))
            in_channels = out_channels
    return specs


class ResNet(nn.Module):
    """A ResNet classifier or backbone with torchvision's structure and names.

    conv1 (7x7, stride 2, 64 channels)-bn1-ReLU, 3x3 max-pool (stride 2, padding 1), the stages
    `layer1`..`layer4` of `block_cls` blocks, global average pool, `fc`. Each stage's output is
    sown as ("intermediates", "layer<k>").

    Differences from torchvision: `features_only` returns the last feature map (a backbone for
    segmentation heads or DETR) instead of logits, and has no `fc`; `attention` puts an
    attention module (e.g. SE) in every block; the number of stages follows `stage_sizes`;
    initialisation is Flax's default (torchvision uses Kaiming normal, fan out, for convs).

    Attributes:
      block_cls: `BasicBlock`, `Bottleneck` or a module taking the same fields.
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      num_classes: outputs of `fc`.
      width_per_group, groups: of the bottleneck 3x3 convolutions (ResNeXt-50 32x4d: 4, 32).
      replace_stride_with_dilation: per stage after the first, dilate instead of striding:
        (False, True, True) gives output stride 8, (False, False, True) 16.
      attention: factory of the per-block attention module (see `AttentionFactory`); None for
        plain ResNets.
      features_only: return the last stage's features, `[B, H / s, W / s, 512 * expansion]`
        with four stages (s = 32, 16 or 8; sizes rounded up).
    """

    block_cls: type[_ResidualBlock]
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width_per_group: int = 64
    groups: int = 1
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    attention: AttentionFactory | None = None
    features_only: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, num_classes]` logits, or the features (see `features_only`)."""
        check_rank("x", x, 4, "[B, H, W, C]")
        specs = block_specs(self)
        x = nn.Conv(_STEM_FEATURES, (7, 7), strides=2, padding=[(3, 3)] * 2, use_bias=False,
                    dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    name="conv1")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, self.param_dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in itertools.groupby(specs, key=lambda spec: spec.stage):
            for spec in blocks:
                x = self.block_cls(**spec.kwargs, name=spec.name)(x, train)
            self.sow("intermediates", stage, x)
        if self.features_only:
            return x
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, name="fc")(pooled)


_SE = functools.partial(SELayer, reduction=16)
_BASIC = functools.partial(ResNet, block_cls=BasicBlock)
_BOTTLENECK = functools.partial(ResNet, block_cls=Bottleneck)

resnet18 = functools.partial(_BASIC, stage_sizes=(2, 2, 2, 2))
resnet34 = functools.partial(_BASIC, stage_sizes=(3, 4, 6, 3))
resnet50 = functools.partial(_BOTTLENECK, stage_sizes=(3, 4, 6, 3))
resnet101 = functools.partial(_BOTTLENECK, stage_sizes=(3, 4, 23, 3))
resnet152 = functools.partial(_BOTTLENECK, stage_sizes=(3, 8, 36, 3))
se_resnet18 = functools.partial(resnet18, attention=_SE)
se_resnet34 = functools.partial(resnet34, attention=_SE)
se_resnet50 = functools.partial(resnet50, attention=_SE)
se_resnet101 = functools.partial(resnet101, attention=_SE)
se_resnet152 = functools.partial(resnet152, attention=_SE)
se_resnext50_32x4d = functools.partial(se_resnet50, groups=32, width_per_group=4)
