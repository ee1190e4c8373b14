"""Small building blocks shared by several mechanism families."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from flax_attention._checks import check_choice
from flax_attention.kernels._dispatch import IMPLEMENTATIONS

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
    precision: jax.lax.PrecisionLike = None

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
            precision=self.precision,
            name="conv",
        )(x)
        x = batch_norm(train, self.dtype, self.param_dtype, name="bn")(x)
        return x if self.activation is None else self.activation(x)


class PointwiseConv(nn.Module):
    """A 1x1 (1, 1x1x1) convolution with `nn.Conv`'s parameters (kernel `[1, ..., 1, C, O]`,
    bias `[O]`), computed as a matrix product over the channels: on the CPU, XLA's gradient of
    a dot is two to four times as fast as that of a 1x1 convolution."""

    features: int
    spatial_dims: int = 2
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, *S, C]` -> `[B, *S, features]`."""
        shape = (*(1,) * self.spatial_dims, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if (
            self.use_bias) else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.dot(x, kernel.reshape(shape[-2:]), precision=self.precision)
        return y if bias is None else y + bias


def conv1x1(features: int, dtype, param_dtype, name: str, use_bias: bool = True,
            spatial_dims: int = 2, **kwargs) -> PointwiseConv:
    """A 1x1 (or 1, 1x1x1) convolution, named like the torch module it mirrors."""
    return PointwiseConv(features, spatial_dims, use_bias, dtype=dtype, param_dtype=param_dtype,
                         name=name, **kwargs)


def query_key_value(module: nn.Module, x: jax.Array, reduction: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 1x1 projections of DANet's PAM and CCNet's CCA, created in `module`'s scope.

    `query_conv` and `key_conv` map C -> C / reduction, `value_conv` C -> C (all with bias), in
    `module`'s dtype, param_dtype and precision.

    Args:
      module: the calling module (inside its `nn.compact` method).
      x: `[B, H, W, C]`.
      reduction: divides C (checked by the caller).

    Returns:
      q, k `[B, H, W, C / reduction]` and v `[B, H, W, C]`.
    """
    channels = x.shape[-1]
    features = {"query_conv": channels // reduction, "key_conv": channels // reduction,
                "value_conv": channels}
    return tuple(  # type: ignore[return-value]
        conv1x1(n, module.dtype, module.param_dtype, name, precision=module.precision)(x)
        for name, n in features.items()
    )


def scaled_residual(module: nn.Module, attended: jax.Array, x: jax.Array) -> jax.Array:
    """`gamma * attended + x` with a learnable `gamma` of shape (1,) that starts at zero (so a
    fresh block is the identity), created in `module`'s scope."""
    gamma = module.param("gamma", nn.initializers.zeros, (1,), module.param_dtype)
    attended, gamma, x = promote_dtype(attended, gamma, x, dtype=module.dtype)
    return gamma * attended + x


def select_attention_fn(attention_fn: Callable[..., jax.Array] | None,
                        default: Callable[..., jax.Array], *, chunk_size: int | None,
                        implementation: str | None) -> Callable[..., jax.Array]:
    """The attention function of a module: its own `attention_fn`, else `default` (an op that
    takes `chunk_size` and `implementation` keywords) with the module's options bound.

    Raises:
      ValueError: an unknown `implementation`, or `chunk_size` or `implementation` given
        together with an `attention_fn`.
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if attention_fn is None:
        return functools.partial(default, chunk_size=chunk_size, implementation=implementation)
    if chunk_size is not None or implementation is not None:
        raise ValueError("chunk_size and implementation apply to the default attention_fn; got "
                         f"chunk_size={chunk_size}, implementation={implementation!r} with "
                         f"attention_fn={attention_fn!r}")
    return attention_fn
