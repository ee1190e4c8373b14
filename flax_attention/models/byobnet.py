"""timm's "bring your own blocks" ResNet of bottlenecks, as far as GC-ResNet-50-T uses it.

timm 1.0.31 builds `gcresnet50t` with `timm/models/byobnet.py` (`ByobNet`, `BottleneckBlock`,
the "tiered" `Stem`), not with its ResNet: other names (`stem.conv1`, `stages.0.0.conv1_1x1`,
`shortcut`, `head.fc`), a stem of three conv-BN-ReLU without max-pool (the third conv strided)
and the attention inside the block, on the bottleneck width, after the 3x3 conv (`attn`). Cao,
Xu, Lin, Wei, Hu: "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond" (ICCV
workshops 2019) for the attention (`GlobalContext` with add fusion, timm's "gca"). NHWC here,
NCHW there; `from_torch` reads timm's keys.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_image
from flax_attention.global_context import GlobalContext
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
from flax_attention.layers import make_divisible
from flax_attention.resnet_blocks import AttentionFactory, call_attention

__all__ = ["ByobBottleneck", "ByobNet", "gcresnet50t"]


def _conv_norm_act(module: nn.Module, features: int, kernel: int, name: str, stride: int = 1,
                   act: bool = True, zero_scale: bool = False) -> layers.ConvBN:
    """timm's `ConvNormAct` (keys `conv`, `bn`; padding `((s - 1) + (k - 1)) // 2`, which is
    `ConvBN`'s for kernels 1 and 3); `zero_scale`: its BN scale starts at zero."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return layers.ConvBN(features, kernel, stride, activation=nn.relu if act else None,
                         scale_init=scale_init, name=name, **layers.numerics(module))


class ByobBottleneck(nn.Module):
    """timm's byobnet `BottleneckBlock` (1x1 - kxk - 1x1), with the attention in the middle.

    `conv1_1x1` (C -> mid), `conv2_kxk` (3x3, stride), the attention `attn` on the mid
    channels, `conv3_1x1` (mid -> out, no activation), plus the shortcut, ReLU; each conv with
    BN (and ReLU). mid = `make_divisible(out_channels * bottle_ratio)`. The shortcut is
    `shortcut` (1x1 conv with the stride, BN) when the stride is not 1 or the channels change,
    else the identity (timm's `downsample="conv1x1"`).

    Differences from timm: no dilation, groups, `extra_conv`, `attn_last`, drop path or
    anti-aliasing; the attention is called with `train` when it takes it.

    Attributes:
      out_channels: output channels.
      stride: of the 3x3 conv and of the shortcut.
      bottle_ratio: mid channels as a fraction of `out_channels`.
      attention: factory of the attention (named `attn`); None for none.
      use_shortcut_conv: force or forbid the projection; None decides from the input
        (`from_torch` needs it set when the stride is 1).
      zero_init_last: the scale of `conv3_1x1`'s BN starts at zero (timm's default).
    """

    out_channels: int
    stride: int = 1
    bottle_ratio: float = 0.25
    attention: AttentionFactory | None = None
    use_shortcut_conv: bool | None = None
    zero_init_last: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def attention_module(self) -> nn.Module | None:
        if self.attention is None:
            return None
        return self.attention(name="attn", **layers.numerics(self))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, out_channels]` (sizes rounded up)."""
        check_image("x", x)
        project = self.use_shortcut_conv
        if project is None:
            project = self.stride != 1 or x.shape[-1] != self.out_channels
        mid = make_divisible(self.out_channels * self.bottle_ratio)
        out = _conv_norm_act(self, mid, 1, "conv1_1x1")(x, train)
        out = _conv_norm_act(self, mid, 3, "conv2_kxk", self.stride)(out, train)
        attention = self.attention_module()
        if attention is not None:
            out = call_attention(attention, out, train)
        out = _conv_norm_act(self, self.out_channels, 1, "conv3_1x1", act=False,
                             zero_scale=self.zero_init_last)(out, train)
        if project:
            x = _conv_norm_act(self, self.out_channels, 1, "shortcut", self.stride,
                               act=False)(x, train)
        return nn.relu(out + x)


class ByobNet(nn.Module):
    """A classifier of `ByobBottleneck` stages with timm's tiered stem (timm's `ByobNet` with
    `stem_type="tiered"`, `stem_pool=""` and bottleneck stages, as in `gcresnet50t`).

    Stem: `stem.conv{1,2,3}`, 3x3 conv-BN-ReLU of `stem_channels`, strides 2, 1, 2. Stages
    `stages.<i>` of `stage_sizes[i]` blocks with `stage_channels[i]` outputs, the first block
    with `stage_strides[i]`. Global average pool, `head.fc`. Each stage's output is sown as
    ("intermediates", "stages_<i>").

    Attributes:
      stage_sizes, stage_channels, stage_strides: per stage.
      stem_channels: of the three stem convs (timm's tiered stem of 64: 24, 32, 64).
      bottle_ratio: of every block.
      attention: factory of every block's attention.
      num_classes: outputs of `head.fc`.
      zero_init_last: every block's last BN scale starts at zero (timm's default).
    """

    stage_sizes: Sequence[int]
    stage_channels: Sequence[int] = (256, 512, 1024, 2048)
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    stem_channels: Sequence[int] = (24, 32, 64)
    bottle_ratio: float = 0.25
    attention: AttentionFactory | None = None
    num_classes: int = 1000
    zero_init_last: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def blocks(self) -> list[tuple[str, str, dict]]:
        """(Flax name, torch prefix, `ByobBottleneck` fields) of every block, in order.

        Raises:
          ValueError: if the per-stage fields differ in length or a stage is empty.
        """
        per_stage = (self.stage_sizes, self.stage_channels, self.stage_strides)
        if len({len(s) for s in per_stage}) != 1 or min(self.stage_sizes, default=0) < 1:
            raise ValueError(f"stage_sizes, stage_channels and stage_strides must be as long and "
                             f"stages non-empty; got {per_stage}")
        blocks, in_channels = [], self.stem_channels[-1]
        for i, (size, channels, stride) in enumerate(zip(*per_stage, strict=True)):
            for j in range(size):
                fields = dict(
                    out_channels=channels, stride=stride if j == 0 else 1,
                    bottle_ratio=self.bottle_ratio, attention=self.attention,
                    use_shortcut_conv=j == 0 and (stride != 1 or in_channels != channels),
                    zero_init_last=self.zero_init_last, **layers.numerics(self))
                blocks.append((f"stages_{i}_{j}", f"stages.{i}.{j}", fields))
                in_channels = channels
        return blocks

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, num_classes]` logits."""
        check_image("x", x)
        for i, (width, stride) in enumerate(zip(self.stem_channels, (2, 1, 2), strict=True)):
            x = _conv_norm_act(self, width, 3, f"stem_conv{i + 1}", stride)(x, train)
        for stage, blocks in itertools.groupby(self.blocks(), key=lambda b: b[0].rsplit("_", 1)[0]):
            for name, _, fields in blocks:
                x = ByobBottleneck(**fields, name=name)(x, train)
            self.sow("intermediates", stage, x)
        pooled = layers.global_average_pool(x)
        return nn.Dense(self.num_classes, name="head_fc", **layers.numerics(self))(pooled)


gcresnet50t = functools.partial(
    ByobNet, stage_sizes=(3, 4, 6, 3),
    attention=functools.partial(GlobalContext, fuse_add=True, fuse_scale=False))


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# timm's keys: `stem.conv{1,2,3}.{conv,bn}`, `stages.<i>.<j>.{conv1_1x1,conv2_kxk,conv3_1x1,
# shortcut}.{conv,bn}`, `stages.<i>.<j>.attn.*`, `head.fc`.

def _conv_norm_act_rules(path: str, prefix: str) -> Rules:
    return conv((path, "conv"), f"{prefix}.conv", bias=False) | batch_norm(
        (path, "bn"), f"{prefix}.bn")


def _block_rules(module: ByobBottleneck) -> Rules:
    names = ["conv1_1x1", "conv2_kxk", "conv3_1x1"] + ["shortcut"] * bool(module.use_shortcut_conv)
    rules: Rules = {}
    for name in names:
        rules |= _conv_norm_act_rules(name, name)
    attention = module.attention_module()
    if attention is not None:
        rules |= nested(rules_for(attention), ("attn",), "attn")
    return rules


def _block_inputs(module: ByobBottleneck, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "conv1_1x1.conv.weight", side=8)


def _net_rules(module: ByobNet) -> Rules:
    rules = dense(("head_fc",), "head.fc")
    for i in range(len(module.stem_channels)):
        rules |= _conv_norm_act_rules(f"stem_conv{i + 1}", f"stem.conv{i + 1}")
    for name, prefix, fields in module.blocks():
        rules |= nested(_block_rules(ByobBottleneck(**fields)), (name,), prefix)
    return rules


def _net_inputs(module: ByobNet, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "stem.conv1.conv.weight", side=32)


register(ByobBottleneck)(Converter(_block_rules, _block_inputs))
register(ByobNet)(Converter(_net_rules, _net_inputs))
