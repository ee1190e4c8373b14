"""Spatial transformer networks.

Jaderberg, Simonyan, Zisserman, Kavukcuoglu: "Spatial Transformer Networks", NeurIPS 2015; the
reference for equivalence is the PyTorch STN tutorial (`localization`, `fc_loc`, `stn()`), with
torch's `affine_grid` / `grid_sample` semantics. NHWC here, NCHW there; parameter names follow the
tutorial so `flax_attention.interop.torch.from_torch` imports its state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_choice, check_image, check_positive, check_rank
from flax_attention.functional import spatial as F
from flax_attention.interop.torch import Converter, Rules, Shapes, conv, dense, register

__all__ = ["SpatialTransformer", "LocalizationNet"]


def _identity_init(transform: str) -> nn.initializers.Initializer:
    """Initialises a bias to the identity parameters of `transform`."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        del key
        return jnp.broadcast_to(jnp.asarray(F.TRANSFORMS[transform], dtype), shape)

    return init


class SpatialTransformer(nn.Module):
    """A spatial transformer: localization net -> transform -> grid -> bilinear sampling.

    `localization` maps the image `[B, H, W, C]` to features `[B, ...]` (flattened); the last
    layer `fc_loc` (a Dense to the transform's parameter count) starts with zero weights and the
    identity bias, so an untrained transformer samples the identity grid. theta `[B, 2, 3]` is
    sown as ("intermediates", "theta").

    Differences from the tutorial: `transform` offers the paper's restricted transforms besides
    the full affine one (see `functional.affine_matrix`); the output size `out_hw` need not be
    the input's; theta, the grid and the sampling weights are float32 even under bf16.

    Attributes:
      localization: the localization network (its own parameters live under "localization").
      out_hw: (h, w) of the output; None for the input's size.
      transform: a key of `functional.TRANSFORMS`.
      align_corners: as in `functional.affine_grid` / `bilinear_sample`.
      padding_mode: "zeros", "border" or "reflection", as in `functional.bilinear_sample`.
      implementation: of the sampling, "xla", "pallas" or None, as in
        `functional.bilinear_sample`.
    """

    localization: nn.Module
    out_hw: tuple[int, int] | None = None
    transform: str = "affine"
    align_corners: bool = False
    padding_mode: str = "zeros"
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, h, w, C]`, (h, w) = `out_hw` or (H, W)."""
        check_rank("x", x, 4, "[B, H, W, C]")
        check_choice("transform", self.transform, F.TRANSFORMS)
        check_choice("padding_mode", self.padding_mode, F.PADDING_MODES)
        check_choice("implementation", self.implementation, F.IMPLEMENTATIONS)
        features = self.localization(x)
        params = nn.Dense(
            len(F.TRANSFORMS[self.transform]),
            kernel_init=nn.initializers.zeros,
            bias_init=_identity_init(self.transform),
            name="fc_loc",
            **layers.numerics(self),
        )(features.reshape(features.shape[0], -1))
        theta = F.affine_matrix(params.astype(jnp.float32), self.transform)
        self.sow("intermediates", "theta", theta)
        out_hw = x.shape[1:3] if self.out_hw is None else self.out_hw
        grid = F.affine_grid(theta, out_hw, self.align_corners, precision=self.precision)
        image = x if self.dtype is None else x.astype(self.dtype)
        return F.bilinear_sample(image, grid, self.padding_mode, self.align_corners,
                                 self.implementation)


class LocalizationNet(nn.Module):
    """The localization network of the PyTorch STN tutorial (1-channel 28 x 28 MNIST).

    Conv(8, 7) -> MaxPool 2 -> ReLU -> Conv(10, 5) -> MaxPool 2 -> ReLU -> flatten -> Dense(32)
    -> ReLU; the tutorial's `fc_loc.2` is the `SpatialTransformer`'s own `fc_loc`. Convolutions
    are named after their index in the tutorial's `localization` Sequential (`conv_0`,
    `conv_3`), the Dense after `fc_loc.0` (`fc_loc_0`). The feature map is flattened in torch's
    NCHW order, so imported weights give the tutorial's numbers. Channels and size are inferred
    from the input (28 x 28 gives the tutorial's 90 flattened features).

    Attributes:
      features: output channels of the convolutions.
      kernel_sizes: their square kernel sizes (no padding, stride 1).
      hidden: width of the Dense layer.
    """

    features: tuple[int, ...] = (8, 10)
    kernel_sizes: tuple[int, ...] = (7, 5)
    hidden: int = 32
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _check(self, x: jax.Array) -> None:
        """Raises ValueError for an empty `x`, mismatched fields, or an image too small."""
        check_image("x", x)
        if len(self.features) != len(self.kernel_sizes):
            raise ValueError(f"features {self.features} and kernel_sizes {self.kernel_sizes} "
                             "must have the same length")
        for i, features in enumerate(self.features):
            check_positive(f"features[{i}]", features)
        size = min(x.shape[1:3])
        for kernel in self.kernel_sizes:
            size = (size - kernel + 1) // 2
        if size < 1:
            raise ValueError(f"x is too small for the localisation net: each conv (kernel_sizes "
                             f"{self.kernel_sizes}, no padding) and 2x2 max-pool leaves no pixel "
                             f"of shape {tuple(x.shape)}")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, hidden]`."""
        self._check(x)
        for i, (features, kernel) in enumerate(zip(self.features, self.kernel_sizes, strict=True)):
            x = nn.Conv(features, (kernel, kernel), padding="VALID", name=f"conv_{3 * i}",
                        **layers.numerics(self))(x)
            x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's flatten order
        x = nn.Dense(self.hidden, name="fc_loc_0", **layers.numerics(self))(x)
        return nn.relu(x)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# The PyTorch STN tutorial's keys: `localization.0`, `localization.3` (convolutions), `fc_loc.0`
# (Linear(90, 32), part of `LocalizationNet` here) and `fc_loc.2` (Linear(32, 6), the
# `SpatialTransformer`'s own `fc_loc`).

def _localization(module: SpatialTransformer) -> LocalizationNet:
    if not isinstance(module.localization, LocalizationNet):
        raise TypeError(
            "from_torch imports a SpatialTransformer only with a LocalizationNet (the STN "
            f"tutorial's), got localization {type(module.localization).__name__}"
        )
    return module.localization


def _conv_keys(net: LocalizationNet) -> list[str]:
    """The tutorial's Sequential indices of the convolutions (each followed by pool and ReLU)."""
    return [f"localization.{3 * i}" for i in range(len(net.features))]


def _rules(module: SpatialTransformer) -> Rules:
    net = _localization(module)
    rules = dense(("fc_loc",), "fc_loc.2") | dense(("localization", "fc_loc_0"), "fc_loc.0")
    for key in _conv_keys(net):
        rules |= conv(("localization", f"conv_{key.split('.')[1]}"), key)
    return rules


def _dim(shapes: Shapes, key: str, axis: int, default: int) -> int:
    """`shapes[key][axis]`, or `default` if that shape is too short (reported as misshaped)."""
    shape = shapes[key]
    return shape[axis] if len(shape) > axis else default


def _example_inputs(module: SpatialTransformer, shapes: Shapes) -> tuple[jnp.ndarray]:
    """An image with the state dict's input channels whose size gives `fc_loc.0`'s inputs.

    The flattened features are (last conv's channels) x side x side; the input side is found by
    undoing each pool (x 2) and valid convolution (+ kernel - 1)."""
    net = _localization(module)
    keys = _conv_keys(net)
    channels = _dim(shapes, f"{keys[0]}.weight", 1, 1)
    last = max(_dim(shapes, f"{keys[-1]}.weight", 0, 1), 1)
    side = max(math.isqrt(_dim(shapes, "fc_loc.0.weight", 1, last) // last), 1)
    for kernel in reversed(net.kernel_sizes):
        side = 2 * side + kernel - 1
    return (jnp.zeros((1, side, side, channels), jnp.float32),)


register(SpatialTransformer)(Converter(_rules, _example_inputs))
