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
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_choice, check_image
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    dense,
    image_input,
    nested,
    register,
    rules_for,
)
from flax_attention.resnet_blocks import AttentionFactory, BasicBlock, Bottleneck, ResidualBlock
from flax_attention.squeeze_excitation import SELayer

_STEM_FEATURES = 64
_STEM_TYPES = ("", "deep", "deep_tiered")

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


def stem_widths(net: ResNet) -> tuple[int, ...]:
    """The output channels of the stem's convolutions, as timm's `stem_type` builds them:
    (64,) for the 7x7 stem, (w, w, 2w) for "deep" and (3 (w // 4), w, 2w) for "deep_tiered",
    w = `stem_width`.

    Raises:
      ValueError: an unknown `stem_type`.
    """
    check_choice("stem_type", net.stem_type, _STEM_TYPES)
    w = net.stem_width
    if not net.stem_type:
        return (_STEM_FEATURES,)
    return (3 * (w // 4) if net.stem_type == "deep_tiered" else w, w, 2 * w)


def block_specs(net: ResNet) -> list[BlockSpec]:
    """The blocks of `net` in order, as torchvision's `_make_layer` builds them.

    Stage k (from 0) has `stage_sizes[k]` blocks of `64 * 2**k` planes; stages after the first
    halve the resolution in their first block, unless `replace_stride_with_dilation[k - 1]`
    multiplies the dilation by 2 instead (the first block of that stage keeps the previous one
    in its first 3x3 convolution, its `first_dilation`, as torchvision and timm do, or with
    `dilate_first_block` takes the new one there too).

    Raises:
      ValueError: if `stage_sizes` or `replace_stride_with_dilation` do not fit.
    """
    sizes, dilate = tuple(net.stage_sizes), tuple(net.replace_stride_with_dilation)
    if not sizes or min(sizes) < 1 or len(dilate) != len(sizes) - 1:
        raise ValueError(
            f"stage_sizes must be positive and replace_stride_with_dilation one shorter; got "
            f"stage_sizes {sizes}, replace_stride_with_dilation {dilate}"
        )
    if net.avg_down and any(dilate):
        raise ValueError(f"avg_down needs replace_stride_with_dilation all False, got {dilate}")
    specs, in_channels, dilation = [], stem_widths(net)[-1], 1
    for k, size in enumerate(sizes):
        planes, stride, previous = _STEM_FEATURES * 2**k, 1 if k == 0 else 2, dilation
        if k and dilate[k - 1]:
            dilation, stride = dilation * stride, 1
            previous = dilation if net.dilate_first_block else previous
        for n in range(size):
            first = n == 0
            out_channels = planes * net.block_cls.expansion
            kwargs = dict(
                planes=planes, stride=stride if first else 1, dilation=dilation,
                first_dilation=previous if first else None, groups=net.groups,
                base_width=net.width_per_group, attention=net.attention,
                use_downsample=first and (stride != 1 or in_channels != out_channels),
                avg_down=net.avg_down, zero_init_last=net.zero_init_last,
                **layers.numerics(net),
            )
            specs.append(BlockSpec(f"layer{k + 1}", n, kwargs))
            in_channels = out_channels
    return specs


def _ceil_extra(size: int) -> int:
    """The extra right padding that makes a 3x3, stride 2, padding 1 max-pool over `size`
    positions round up as torch's `ceil_mode=True` does (the last window must start inside the
    input or the left padding)."""
    out = -(-(size - 1) // 2) + 1
    if 2 * (out - 1) >= size + 1:
        out -= 1
    return 2 * (out - 1) + 3 - (size + 2)


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
      stem_type, stem_width: timm's stems (see `stem_widths`): "" the 7x7 conv; "deep" (the
        "c"/"d" ResNets) and "deep_tiered" (the "t" ones) three 3x3 convs `conv1.{0,3,6}` with
        BNs `conv1.{1,4}` between them, the first with stride 2, then bn1 and the max-pool.
      avg_down: timm's avg-pool shortcuts ("d", "t"): see `ResidualBlock`; the 1x1 shortcut conv
        is `downsample.1` and its BN `downsample.2`. Not with `replace_stride_with_dilation`.
      dilate_first_block: the first block of a dilated stage takes the stage's dilation, not the
        previous stage's (speedinghzl/CCNet's ResNet: all of layer3 at 2, all of layer4 at 4).
      ceil_pool: the stem's max-pool rounds its output size up (torch's `ceil_mode=True`, as
        CCNet's ResNet), so an even input side `n` gives `n / 2 + 1`.
      feature_stages: with `features_only`, return the outputs of these stages (1 = `layer1`)
        as a tuple instead of the last feature map.
      zero_init_last: every block's last BatchNorm scale starts at zero (timm's default, True
        in its ResNets here; torchvision's `zero_init_residual`, False).
    """

    block_cls: type[ResidualBlock]
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width_per_group: int = 64
    groups: int = 1
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    attention: AttentionFactory | None = None
    features_only: bool = False
    stem_type: str = ""
    stem_width: int = 64
    avg_down: bool = False
    dilate_first_block: bool = False
    ceil_pool: bool = False
    feature_stages: Sequence[int] = ()
    zero_init_last: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        """conv1 (7x7, or timm's deep stem `conv1_{0,1,3,4,6}`: three 3x3 convs, the first with
        stride 2, BN-ReLU between them), bn1, ReLU, max-pool."""
        widths = stem_widths(self)
        if len(widths) == 1:
            x = nn.Conv(widths[0], (7, 7), strides=2, padding=[(3, 3)] * 2, use_bias=False,
                        name="conv1", **layers.numerics(self))(x)
        else:
            for i, width in enumerate(widths):
                if i:
                    x = nn.relu(layers.batch_norm(train, self.dtype, self.param_dtype,
                                                  name=f"conv1_{3 * i - 2}")(x))
                x = nn.Conv(width, (3, 3), strides=2 if i == 0 else 1, padding=[(1, 1)] * 2,
                            use_bias=False, name=f"conv1_{3 * i}", **layers.numerics(self))(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, self.param_dtype, name="bn1")(x))
        padding = [(1, 1 + _ceil_extra(n) if self.ceil_pool else 1) for n in x.shape[1:3]]
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, num_classes]` logits, or the features (see `features_only`)."""
        check_image("x", x)
        specs = block_specs(self)
        x = self._stem(x, train)
        stages = []
        for stage, blocks in itertools.groupby(specs, key=lambda spec: spec.stage):
            for spec in blocks:
                x = self.block_cls(**spec.kwargs, name=spec.name)(x, train)
            self.sow("intermediates", stage, x)
            stages.append(x)
        if self.features_only and self.feature_stages:
            bad = [k for k in self.feature_stages if not 1 <= k <= len(stages)]
            if bad:
                raise ValueError(f"feature_stages must be in 1..{len(stages)}, got "
                                 f"{tuple(self.feature_stages)}")
            return tuple(stages[k - 1] for k in self.feature_stages)
        if self.features_only:
            return x
        pooled = layers.global_average_pool(x)
        return nn.Dense(self.num_classes, name="fc", **layers.numerics(self))(pooled)


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


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are torchvision's ResNet names (`conv1`, `bn1`, `layer<k>.<n>.{conv1,bn1,...}`,
# `layer<k>.<n>.downsample.{0,1}`, `fc`), with moskomule/senet.pytorch's `se.fc.*` inside the blocks
# of SE-ResNets.

def _stem_rules(module: ResNet) -> Rules:
    if len(stem_widths(module)) == 1:
        return conv(("conv1",), "conv1", bias=False) | batch_norm(("bn1",), "bn1")
    rules = batch_norm(("bn1",), "bn1")
    for i in (0, 3, 6):
        rules |= conv((f"conv1_{i}",), f"conv1.{i}", bias=False)
    for i in (1, 4):
        rules |= batch_norm((f"conv1_{i}",), f"conv1.{i}")
    return rules


def _resnet_rules(module: ResNet) -> Rules:
    rules = _stem_rules(module)
    for spec in block_specs(module):
        block = module.block_cls(**spec.kwargs)
        rules |= nested(rules_for(block), (spec.name,), spec.torch_prefix)
    if not module.features_only:
        rules |= dense(("fc",), "fc")
    return rules


def first_conv_key(module: ResNet) -> str:
    """The torch key of the stem's first convolution weight (it tells the input channels)."""
    return "conv1.weight" if len(stem_widths(module)) == 1 else "conv1.0.weight"


def _resnet_inputs(module: ResNet, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, first_conv_key(module), side=32)


register(ResNet)(Converter(_resnet_rules, _resnet_inputs))
