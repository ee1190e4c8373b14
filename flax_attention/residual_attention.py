"""Residual Attention Network blocks (Wang et al., "Residual Attention Network for Image
Classification", CVPR 2017).

An attention module splits into a trunk branch T (t pre-activation residual units) and a soft
mask branch M: a bottom-up (3x3/2 max-pool) / top-down (bilinear upsampling) hourglass with a
residual-unit skip connection at every level but the innermost, ending in
BN-ReLU-1x1conv-BN-ReLU-1x1conv-sigmoid. The output is the attention residual (1 + M) * T,
framed by p residual units before and after. Stages 1/2/3 have 3/2/1 down-up levels.

Shapes use the legend B batch, H height, W width, C channels. The pure functions
(`interpolate_bilinear`, `attention_residual`) are the math; the modules own the parameters.

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
import numpy as np

from flax_attention._checks import check_divisible, check_rank
from flax_attention.layers import batch_norm

__all__ = [
    "PreActBottleneck",
    "ResidualAttentionModule",
    "attention_residual",
    "interpolate_bilinear",
]

_LAYOUT = "[B, H, W, C]"
Precision = jax.lax.PrecisionLike


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """`[n_out, n_in]` weights of 1-D linear interpolation with aligned corners."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    weights.flags.writeable = False
    return weights


def interpolate_bilinear(x: jax.Array, size: tuple[int, int],
                         precision: Precision = None) -> jax.Array:
    """Bilinear resize with aligned corners, as torch's `UpsamplingBilinear2d`.

    The corner pixel centres of input and output coincide (`align_corners=True`), so output
    pixel i samples input position `i * (H - 1) / (H' - 1)`. Computed as two small
    interpolation-matrix products (rows, then columns); gradients flow to `x`.

    Args:
      x: `[B, H, W, C]`.
      size: `(H', W')`, the output's spatial size (positive).
      precision: of the matrix products.

    Returns:
      `[B, H', W', C]` in the dtype of `x`.
    """
    check_rank("x", x, 4, _LAYOUT)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be two positive ints (H', W'), got {tuple(size)}")
    rows = jnp.asarray(_interpolation_matrix(size[0], x.shape[1]), x.dtype)
    cols = jnp.asarray(_interpolation_matrix(size[1], x.shape[2]), x.dtype)
    x = jnp.einsum("ph,bhwc->bpwc", rows, x, precision=precision)
    return jnp.einsum("qw,bpwc->bpqc", cols, x, precision=precision)


def _pointwise_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, *, precision=None,
                    **unused) -> jax.Array:
    """`lax.conv_general_dilated` for a 1x1 kernel without padding, dilation or groups (NHWC,
    HWIO, as `_convolutions` calls it), as a matrix product: Attention-56 runs about 8% faster
    on CPU than with XLA's convolution."""
    del padding, unused
    x = lhs[:, :: window_strides[0], :: window_strides[1], :]
    return jnp.einsum("bhwc,cd->bhwd", x, rhs[0, 0], precision=precision)


def _convolutions(module: nn.Module) -> tuple[functools.partial, functools.partial]:
    """`nn.Conv` factories without bias in the module's dtypes: any kernel, and 1x1 (dot)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=module.dtype,
                             param_dtype=module.param_dtype, precision=module.precision)
    pointwise = functools.partial(conv, kernel_size=(1, 1), padding=0,
                                  conv_general_dilated=_pointwise_conv)
    return conv, pointwise


def attention_residual(trunk: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention residual learning: `(1 + mask) * trunk`.

    Args:
      trunk: `[B, H, W, C]`, the trunk branch's features T.
      mask: `[B, H, W, C]`, the soft mask M in [0, 1].

    Returns:
      `[B, H, W, C]`: T where the mask is 0, up to 2 T where it is 1.
    """
    check_rank("trunk", trunk, 4, _LAYOUT)
    if mask.shape != trunk.shape:
        raise ValueError(
            f"mask must have the shape of trunk {tuple(trunk.shape)}, got {tuple(mask.shape)}"
        )
    return (1 + mask) * trunk


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
        conv, pointwise = _convolutions(self)
        bn = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        width = self.features // 4
        pre = nn.relu(bn(name="bn1")(x))
        y = pointwise(width, name="conv1")(pre)
        y = nn.relu(bn(name="bn2")(y))
        y = conv(width, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
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
        unit = PreActBottleneck(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                                precision=self.precision, name=name)
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
        bn = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        _, pointwise = _convolutions(self)
        m = pointwise(x.shape[-1], name="mask_conv1")(nn.relu(bn(name="mask_bn1")(m)))
        m = pointwise(x.shape[-1], name="mask_conv2")(nn.relu(bn(name="mask_bn2")(m)))
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
