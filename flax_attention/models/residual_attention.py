"""Residual Attention Networks: Attention-56 and Attention-92 (Wang et al., "Residual Attention
Network for Image Classification", CVPR 2017), for ImageNet and CIFAR.

ImageNet: 7x7/2 stem (64) and a 3x3/2 max-pool, then three stages, each a residual unit
(256, 512, 1024 channels; strides 1, 2, 2) and attention modules of stage 1, 2, 3 (1, 1, 1 for
Attention-56; 1, 2, 3 for Attention-92), then three residual units at 2048 (the first of
stride 2), BN-ReLU, global average pooling and the classifier. Input H and W must be
divisible by the total stride 32 (224 -> 7x7 before the pooling).

CIFAR (as the PyTorch port's `ResidualAttentionModel_92_32input_update`): a 3x3 stem (32) and
no max-pool, stages at 128, 256, 512 channels (strides 1, 2, 2) whose attention modules have one
down-up level fewer (2/1/0), residual units at 1024 of stride 1; H and W divisible by 4
(32 -> 8x8 before the pooling).

Differences from the port: global average pooling instead of its fixed-size `AvgPool2d`, so any
input size divisible by the total stride works; `num_classes` is a field (the port fixes 10).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention._checks import check_divisible, check_rank
from flax_attention.interop.torch import Converter, mirror_rules, register
from flax_attention.layers import ConvBN, batch_norm, numerics
from flax_attention.residual_attention import PreActBottleneck, ResidualAttentionModule

__all__ = [
    "ResidualAttentionNetwork",
    "residual_attention_56",
    "residual_attention_56_cifar",
    "residual_attention_92",
    "residual_attention_92_cifar",
]

Precision = jax.lax.PrecisionLike


class ResidualAttentionNetwork(nn.Module):
    """Residual Attention Network classifier (Wang et al., CVPR 2017).

    Submodule names follow the PyTorch port: `conv1` (stem), `residual_block1..6`,
    `attention_module{stage}_{j}`, `final_bn`, `fc`.

    Attributes:
      stage_sizes: attention modules in stages 1, 2, 3.
      num_classes: classifier outputs.
      cifar: the 32x32 variant (3x3 stem, no max-pool, last stride 1, one mask level fewer).
      width: stem channels; the stages have 4, 8, 16 and 32 times as many.
    """

    stage_sizes: Sequence[int]
    num_classes: int = 1000
    cifar: bool = False
    width: int = 64
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: Precision = None

    @property
    def total_stride(self) -> int:
        return 4 if self.cifar else 32

    def _check(self, x: jax.Array) -> None:
        check_rank("x", x, 4, "[B, H, W, C]")
        if len(self.stage_sizes) != 3:
            raise ValueError(f"stage_sizes must have 3 entries, got {tuple(self.stage_sizes)}")
        for axis, name in ((1, "height"), (2, "width")):
            check_divisible(f"x {name} (shape {tuple(x.shape)})", x.shape[axis],
                            self.total_stride, "the network's total stride")

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        kernel = 3 if self.cifar else 7
        x = ConvBN(self.width, kernel, strides=1 if self.cifar else 2, name="conv1",
                   **numerics(self))(x, train)
        if self.cifar:
            return x
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, 3]` images -> `[B, num_classes]` logits."""
        self._check(x)
        common = numerics(self)
        unit = functools.partial(PreActBottleneck, **common)
        x = self._stem(x, train)
        strides = (1, 2, 2, 1 if self.cifar else 2)
        for stage, count in enumerate(self.stage_sizes, start=1):
            x = unit(4 * self.width * 2 ** (stage - 1), strides[stage - 1],
                     name=f"residual_block{stage}")(x, train)
            for j in range(count):
                levels = 3 - stage if self.cifar else None
                module = ResidualAttentionModule(stage, down_levels=levels,
                                                 name=f"attention_module{stage}_{j}", **common)
                x = module(x, train)
        for i, stride in enumerate((strides[3], 1, 1), start=4):
            x = unit(32 * self.width, stride, name=f"residual_block{i}")(x, train)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc", **common)(x)


residual_attention_56 = functools.partial(ResidualAttentionNetwork, stage_sizes=(1, 1, 1))
residual_attention_92 = functools.partial(ResidualAttentionNetwork, stage_sizes=(1, 2, 3))
residual_attention_56_cifar = functools.partial(
    ResidualAttentionNetwork, stage_sizes=(1, 1, 1), cifar=True, width=32, num_classes=10
)
residual_attention_92_cifar = functools.partial(
    ResidualAttentionNetwork, stage_sizes=(1, 2, 3), cifar=True, width=32, num_classes=10
)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# The torch twin mirrors the Flax variable tree (see `interop.torch.mirror_rules`).


def _network_example(module: ResidualAttentionNetwork, channels: int) -> tuple[jax.Array]:
    side = module.total_stride
    return (jnp.zeros((1, side, side, channels), jnp.float32),)


register(ResidualAttentionNetwork)(Converter(
    lambda module: mirror_rules(module, *_network_example(module, 3)),
    lambda module, shapes: _network_example(module, shapes["conv1.conv.weight"][1]),
))
