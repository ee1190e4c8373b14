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

With `port=True` the network is tengshaofeng/ResidualAttentionNetwork-pytorch's own, loadable
whole from its checkpoints by `from_torch` with the port's keys (`conv1.0`, `residual_block1`,
`attention_module2_2`, `trunk_branches.0`, `softmax1_blocks` / `down_residual_blocks1`,
`skip1_connection_residual_block`, `conv1_1_blocks.2`, `mpool2.0`, `fc`, ...): its mask adds the
map before each max-pool (and at the top the trunk) to every upsampled map, and every residual
unit stores a `conv4` weight, used only where the shape changes. The registry names
`residual_attention_92_32input_update` (the port's CIFAR-10 model, `model_92_sgd.pkl`; 32 x 32
input) and `residual_attention_56_port`, `residual_attention_92_port` (its
`ResidualAttentionModel_56` / `_92`; 224 x 224 input, 10 classes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention._checks import check_divisible, check_image
from flax_attention.functional.residual_attention import attention_residual, interpolate_bilinear
from flax_attention.interop.torch import Converter, Rule, Rules, mirror_rules, register
from flax_attention.layers import ConvBN, PointwiseConv, batch_norm, global_average_pool, numerics
from flax_attention.residual_attention import PreActBottleneck, ResidualAttentionModule

__all__ = [
    "ResidualAttentionNetwork",
    "residual_attention_56",
    "residual_attention_56_cifar",
    "residual_attention_92",
    "residual_attention_92_cifar",
    "residual_attention_56_port",
    "residual_attention_92_port",
    "residual_attention_92_32input_update",
]

Precision = jax.lax.PrecisionLike


class PortUnit(PreActBottleneck):
    """The port's `ResidualBlock`: a `PreActBottleneck` that holds its `conv4` projection even
    where the shape is kept and the shortcut is the identity (the port creates it in every
    unit)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, ceil(H / strides), ceil(W / strides), features]`."""
        y = super().__call__(x, train)
        if x.shape[-1] == self.features and self.strides == 1:  # created, unused
            PointwiseConv(self.features, use_bias=False, name="conv4", **numerics(self))(
                x[:, :1, :1])
        return y


class PortAttentionModule(ResidualAttentionModule):
    """The port's attention modules (`AttentionModule_stage1..3` and `_cifar`): as
    `ResidualAttentionModule`, with the port's mask sums: each upsampled map gets the map that
    level max-pooled and its skip added (at the top, the trunk), and `PortUnit`s."""

    def _unit(self, x: jax.Array, name: str, train: bool) -> jax.Array:
        return PortUnit(x.shape[-1], name=name, **numerics(self))(x, train)

    def _port_mask(self, x: jax.Array, trunk: jax.Array, train: bool) -> jax.Array:
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                 padding=((1, 1), (1, 1)))
        m, downs, skips = x, [], []
        for level in range(self.levels - 1):
            m = self._units(pool(m), self.r, f"down_{level}", train)
            downs.append(m)
            skips.append(self._unit(m, f"skip_{level}", train))
        m = self._units(pool(m) if self.levels else m, 2 * self.r, "middle", train)
        for level in reversed(range(self.levels - 1)):
            m = interpolate_bilinear(m, downs[level].shape[1:3], self.precision)
            m = self._units(m + downs[level] + skips[level], self.r, f"up_{level}", train)
        if self.levels:
            m = interpolate_bilinear(m, x.shape[1:3], self.precision) + trunk
        return self._mask_head(m, train)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        self._check(x)
        x = self._units(x, self.p, "first", train)
        trunk = self._units(x, self.t, "trunk", train)
        mask = self._port_mask(x, trunk, train)
        self.sow("intermediates", "attention", mask)
        return self._units(attention_residual(trunk, mask), self.p, "last", train)


class ResidualAttentionNetwork(nn.Module):
    """Residual Attention Network classifier (Wang et al., CVPR 2017).

    Submodule names follow the PyTorch port: `conv1` (stem), `residual_block1..6`,
    `attention_module{stage}_{j}`, `final_bn`, `fc`.

    Attributes:
      stage_sizes: attention modules in stages 1, 2, 3.
      num_classes: classifier outputs.
      cifar: the 32x32 variant (3x3 stem, no max-pool, last stride 1, one mask level fewer).
      width: stem channels; the stages have 4, 8, 16 and 32 times as many.
      port: tengshaofeng's structure and keys (`PortAttentionModule`, `PortUnit`; see the
        module docstring).
    """

    stage_sizes: Sequence[int]
    num_classes: int = 1000
    cifar: bool = False
    width: int = 64
    port: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: Precision = None

    @property
    def total_stride(self) -> int:
        return 4 if self.cifar else 32

    def _check(self, x: jax.Array) -> None:
        check_image("x", x)
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
        unit = functools.partial(PortUnit if self.port else PreActBottleneck, **common)
        attention = PortAttentionModule if self.port else ResidualAttentionModule
        x = self._stem(x, train)
        strides = (1, 2, 2, 1 if self.cifar else 2)
        for stage, count in enumerate(self.stage_sizes, start=1):
            x = unit(4 * self.width * 2 ** (stage - 1), strides[stage - 1],
                     name=f"residual_block{stage}")(x, train)
            for j in range(count):
                levels = 3 - stage if self.cifar else None
                module = attention(stage, down_levels=levels,
                                   name=f"attention_module{stage}_{j}", **common)
                x = module(x, train)
        for i, stride in enumerate((strides[3], 1, 1), start=4):
            x = unit(32 * self.width, stride, name=f"residual_block{i}")(x, train)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="final_bn")(x))
        x = global_average_pool(x)
        return nn.Dense(self.num_classes, name="fc", **common)(x)


residual_attention_56 = functools.partial(ResidualAttentionNetwork, stage_sizes=(1, 1, 1))
residual_attention_92 = functools.partial(ResidualAttentionNetwork, stage_sizes=(1, 2, 3))
residual_attention_56_cifar = functools.partial(
    ResidualAttentionNetwork, stage_sizes=(1, 1, 1), cifar=True, width=32, num_classes=10
)
residual_attention_92_cifar = functools.partial(
    ResidualAttentionNetwork, stage_sizes=(1, 2, 3), cifar=True, width=32, num_classes=10
)
residual_attention_56_port = functools.partial(residual_attention_56, port=True, num_classes=10)
residual_attention_92_port = functools.partial(residual_attention_92, port=True, num_classes=10)
residual_attention_92_32input_update = functools.partial(residual_attention_92_cifar, port=True)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Without `port`, the torch twin mirrors the Flax variable tree (see `interop.torch.mirror_rules`).
# With `port`, the same rules renamed to tengshaofeng's keys (`_port_key`).

_PORT_TOP = {"conv1.conv": "conv1.0", "conv1.bn": "conv1.1", "final_bn": "mpool2.0"}
_PORT_HEAD = {"mask_bn1": "0", "mask_conv1": "2", "mask_bn2": "3", "mask_conv2": "5"}


def _port_inner(name: str, levels: int, cifar: bool) -> str:
    """A submodule of an attention module with `levels` levels: our name -> the port's."""
    if name in _PORT_HEAD:
        head = "conv1_1_blocks" if cifar else f"softmax{2 * levels}_blocks"
        return f"{head}.{_PORT_HEAD[name]}"
    kind, index, *_ = name.split("_")
    n = int(index)
    cifar_names = {"down": f"down_residual_blocks{n + 1}", "up": f"up_residual_blocks{n + 1}",
                   "middle": f"middle_2r_blocks.{n}"}
    imagenet_names = {"down": f"softmax{n + 1}_blocks", "up": f"softmax{2 * levels - 1 - n}_blocks",
                      "middle": f"softmax{levels}_blocks.{n}"}
    names = {"first": "first_residual_blocks", "last": "last_blocks",
             "trunk": f"trunk_branches.{n}", "skip": f"skip{n + 1}_connection_residual_block",
             **(cifar_names if cifar else imagenet_names)}
    return names[kind]


def _port_key(module: ResidualAttentionNetwork, key: str) -> str:
    """A mirrored key (`attention_module2_1.down_0_0.bn1.weight`) -> the port's
    (`attention_module2_2.softmax1_blocks.bn1.weight`)."""
    first, rest = key.split(".", 1)
    if not first.startswith("attention_module"):
        module_path, leaf = key.rsplit(".", 1)
        return f"{_PORT_TOP.get(module_path, module_path)}.{leaf}"
    stage, j = (int(i) for i in first.removeprefix("attention_module").split("_"))
    inner, rest = rest.split(".", 1)
    levels = 3 - stage if module.cifar else 4 - stage
    outer = f"attention_module{stage}" + (f"_{j + 1}" if j else "")
    return f"{outer}.{_port_inner(inner, levels, module.cifar)}.{rest}"


def _network_rules(module: ResidualAttentionNetwork) -> Rules:
    rules = mirror_rules(module, *_network_example(module, 3))
    if not module.port:
        return rules
    return {path: Rule(_port_key(module, r.key), r.transform) for path, r in rules.items()}


def _network_example(module: ResidualAttentionNetwork, channels: int) -> tuple[jax.Array]:
    side = module.total_stride
    return (jnp.zeros((1, side, side, channels), jnp.float32),)


register(ResidualAttentionNetwork)(Converter(
    _network_rules,
    lambda module, shapes: _network_example(
        module, shapes["conv1.0.weight" if module.port else "conv1.conv.weight"][1]),
))
