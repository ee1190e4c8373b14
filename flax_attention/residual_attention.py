"""Residual Attention Network blocks (Wang et al., "Residual Attention Network for Image
Classification", CVPR 2017).

An attention module splits into a trunk branch T (t pre-activation residual units) and a soft
mask branch M: a bottom-up (3x3/2 max-pool) / top-down (bilinear upsampling) hourglass with a
residual-unit skip connection at every level but the innermost, ending in
BN-ReLU-1x1conv-BN-ReLU-1x1conv-sigmoid. The output is the attention residual (1 + M) * T,
framed by p residual units before and after. Stages 1/2/3 have 3/2/1 down-up levels.

Shapes use the legend B batch, H height, W width, C channels. The math (`interpolate_bilinear`,
`attention_residual`) is in `flax_attention.functional`; the modules own the parameters.

Differences from the references:
- The common PyTorch port (tengshaofeng/ResidualAttentionNetwork-pytorch) hard-codes the
  upsampling sizes for 224 (or 32) inputs; here each upsampling goes to the size of the skip
  tensor it is added to, so any input size works (odd sizes too: the padded max-pool rounds up).
- The port's later revision also adds the pre-pool feature map (and, at the top, the trunk) to
  every upsampled map; this follows the paper and the authors' Caffe model, which add only the
  skip connection.
- Channels are inferred from the input and kept (the port and paper always use in == out);
  the networks change channels with the residual units between stages.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention._checks import check_divisible, check_rank
from flax_attention.functional.residual_attention import attention_residual, interpolate_bilinear
from flax_attention.interop.torch import Converter, mirror_rules, register
from flax_attention.layers import PointwiseConv, batch_norm, numerics

__all__ = ["PreActBottleneck", "ResidualAttentionModule"]

_LAYOUT = "[B, H, W, C]"
Precision = jax.lax.PrecisionLike


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck residual unit (He et al. 2016), the unit of the network.

    BN-ReLU-1x1conv-BN-ReLU-3x3conv(stride)-BN-ReLU-1x1conv with a bottleneck of features / 4;
    the shortcut is a strided 1x1 projection of the first activation when the channels or the
    stride change (the identity otherwise). Parameter names follow the PyTorch port's
    `ResidualBlock`: bn1, conv1, bn2, conv2, bn3, conv3 and conv4 (the projection).

    Attributes:
      features: output channels (divisible by 4).
      strides: of the 3x3 convolution and the projection.
    """

    features: int
    strides: int = 1
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, ceil(H / strides), ceil(W / strides), features]`."""
        check_rank("x", x, 4, _LAYOUT)
        check_divisible("features", self.features, 4, "the bottleneck factor")
        pointwise = functools.partial(PointwiseConv, use_bias=False, **numerics(self))
        bn = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        width = self.features // 4
        pre = nn.relu(bn(name="bn1")(x))
        y = pointwise(width, name="conv1")(pre)
        y = nn.relu(bn(name="bn2")(y))
        y = nn.Conv(width, (3, 3), strides=self.strides, padding=1, use_bias=False, name="conv2",
                    **numerics(self))(y)
        y = pointwise(self.features, name="conv3")(nn.relu(bn(name="bn3")(y)))
        if x.shape[-1] != self.features or self.strides != 1:
            x = pointwise(self.features, strides=self.strides, name="conv4")(pre)
        return y + x.astype(y.dtype)


class ResidualAttentionModule(nn.Module):
    """Attention module of the Residual Attention Network (Wang et al., CVPR 2017).

    `[B, H, W, C]` -> `[B, H, W, C]` for any H, W >= 1. Submodules: `first_i` (p units),
    `trunk_i` (t units); the mask's `down_l_i` (r units after the l-th max-pool), `skip_l`,
    `middle_i` (2r units at the innermost level), `up_l_i` (r units), `mask_bn1`, `mask_conv1`,
    `mask_bn2`, `mask_conv2`; then `last_i` (p units). The mask is sown as
    `("intermediates", "attention")`. See the file's docstring for what differs from the port.

    Attributes:
      stage: 1, 2 or 3; sets the mask's down-up levels to 4 - stage (3/2/1).
      p: residual units before and after the trunk/mask split.
      t: residual units of the trunk branch.
      r: residual units between adjacent pooling layers of the mask branch.
      down_levels: overrides 4 - stage (the CIFAR networks use one level fewer; 0 keeps the
        mask at full resolution).
    """

    stage: int = 1
    p: int = 1
    t: int = 2
    r: int = 1
    down_levels: int | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: Precision = None

    @property
    def levels(self) -> int:
        return 4 - self.stage if self.down_levels is None else self.down_levels

    def _check(self, x: jax.Array) -> None:
        check_rank("x", x, 4, _LAYOUT)
        check_divisible(f"x channels (shape {tuple(x.shape)})", x.shape[-1], 4,
                        "the bottleneck factor")
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be one of (1, 2, 3), got {self.stage!r}")
        if self.p < 0 or min(self.t, self.r) < 1 or self.levels < 0:
            raise ValueError(
                "need p >= 0, t >= 1, r >= 1, down_levels >= 0; got "
                f"p={self.p}, t={self.t}, r={self.r}, down_levels={self.down_levels}"
            )

    def _unit(self, x: jax.Array, name: str, train: bool) -> jax.Array:
        unit = PreActBottleneck(x.shape[-1], name=name, **numerics(self))
        return unit(x, train)

    def _units(self, x: jax.Array, count: int, prefix: str, train: bool) -> jax.Array:
        for i in range(count):
            x = self._unit(x, f"{prefix}_{i}", train)
        return x

    def _mask(self, x: jax.Array, train: bool) -> jax.Array:
        """The soft mask branch: hourglass, then the 1x1 head; `[B, H, W, C]` in [0, 1]."""
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                 padding=((1, 1), (1, 1)))
        m, skips = x, []
        for level in range(self.levels - 1):
            m = self._units(pool(m), self.r, f"down_{level}", train)
            skips.append(self._unit(m, f"skip_{level}", train))
        m = self._units(pool(m) if self.levels else m, 2 * self.r, "middle", train)
        for level in reversed(range(self.levels - 1)):
            m = interpolate_bilinear(m, skips[level].shape[1:3], self.precision) + skips[level]
            m = self._units(m, self.r, f"up_{level}", train)
        if self.levels:
            m = interpolate_bilinear(m, x.shape[1:3], self.precision)
        return self._mask_head(m, train)

    def _mask_head(self, m: jax.Array, train: bool) -> jax.Array:
        """BN-ReLU-1x1conv-BN-ReLU-1x1conv-sigmoid: `[B, H, W, C]` -> `[B, H, W, C]`."""
        bn = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        pointwise = functools.partial(PointwiseConv, use_bias=False, **numerics(self))
        m = pointwise(m.shape[-1], name="mask_conv1")(nn.relu(bn(name="mask_bn1")(m)))
        m = pointwise(m.shape[-1], name="mask_conv2")(nn.relu(bn(name="mask_bn2")(m)))
        return jax.nn.sigmoid(m.astype(jnp.float32)).astype(m.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`; `train` switches BatchNorm to batch statistics."""
        self._check(x)
        x = self._units(x, self.p, "first", train)
        trunk = self._units(x, self.t, "trunk", train)
        mask = self._mask(x, train)
        self.sow("intermediates", "attention", mask)
        return self._units(attention_residual(trunk, mask), self.p, "last", train)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# The PyTorch twin (tests/reference/residual_attention.py) names every submodule as the Flax
# module does (`first_0`, `down_1_0`, `mask_conv2`, ...): the rules mirror the Flax variable tree.
# No published checkpoint uses these names: the common port (tengshaofeng) names its submodules
# per stage (`softmax1_blocks`, ...).


def _module_example(channels: int) -> tuple[jax.Array]:
    return (jnp.zeros((1, 8, 8, channels), jnp.float32),)


register(ResidualAttentionModule)(Converter(
    lambda module: mirror_rules(module, *_module_example(4)),
    lambda module, shapes: _module_example(shapes["trunk_0.bn1.weight"][0]),
))
