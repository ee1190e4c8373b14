"""Small building blocks shared by several mechanism families."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array] | None


def batch_norm(train: bool, dtype, param_dtype, name: str | None = None, **kwargs) -> nn.BatchNorm:
    """A BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5); statistics in float32."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        **kwargs,
    )


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation, as torch's `Sequential(conv, bn, act)`.

    Attributes:
      features: output channels.
      kernel_size: square kernel size; padding keeps the spatial size at stride 1.
      strides: convolution stride.
      activation: applied after the norm; None for none.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    activation: Activation = nn.relu
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H', W', features]`."""
        pad = self.dilation * (self.kernel_size - 1) // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size,) * 2,
            strides=self.strides,
            padding=[(pad, pad)] * 2,
            kernel_dilation=self.dilation,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = batch_norm(train, self.dtype, self.param_dtype, name="bn")(x)
        return x if self.activation is None else self.activation(x)


def conv1x1(features: int, dtype, param_dtype, name: str, use_bias: bool = True,
            spatial_dims: int = 2, **kwargs) -> nn.Conv:
    """A 1x1 (or 1, 1x1x1) convolution, named like the torch module it mirrors."""
    kernel: Sequence[int] = (1,) * spatial_dims
    return nn.Conv(features, kernel, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                   name=name, **kwargs)
