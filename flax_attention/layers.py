"""Small building blocks shared by several mechanism families, and the conventions of every
module.

Conventions (the one module contract):

- Numerics: every module has `dtype` (computation), `param_dtype` and `precision` fields and
  passes all three on to each submodule it builds with `**layers.numerics(self)`, so that
  `precision` reaches every convolution, dense layer and einsum.
- Flags: a module with BatchNorm takes `train: bool = False` as a call argument (True: batch
  statistics, and the "batch_stats" collection must be mutable); a module with dropout takes
  `deterministic: bool = True` as a call argument (False: dropout on, needs a "dropout" rng); a
  module with both takes both and passes each on unchanged. Neither is a module field.
- Attention: the modules of a mechanism with a swappable kernel (criss-cross, PAM, non-local,
  multi-head attention) have an `attention_fn` field, called as
  `attention_fn(q, k, v, *, precision, implementation)` (the `AttentionFn` signature) with the
  module's `precision` and `implementation` fields; its default is the family's functional op,
  to which `bind_attention_fn` binds the module's other options (such as `chunk_size`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from flax_attention._checks import check_positive

Activation = Callable[[jax.Array], jax.Array] | None
# `attention_fn(q, k, v, *, precision, implementation) -> out`; see the module docstring.
AttentionFn = Callable[..., jax.Array]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """timm's channel rounding (`timm.layers.helpers.make_divisible`).

    `max(min_value, int(v + divisor / 2) // divisor * divisor)`, plus `divisor` if that is below
    `round_limit * v`; `min_value` defaults to `divisor`.
    """
    min_value = min_value or divisor
    rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * v else rounded


def numerics(module: nn.Module) -> dict[str, Any]:
    """The `dtype`, `param_dtype` and `precision` of `module`, to build a submodule with:
    `nn.Dense(features, **layers.numerics(self))`."""
    return {"dtype": module.dtype, "param_dtype": module.param_dtype,
            "precision": module.precision}


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Max-pool with stride = window, flooring odd sizes (torch's MaxPool, "VALID").

    By reshaping each pooled axis into (size / k, k) and reducing: on the CPU its gradient (a
    mask) is several times faster than XLA's select-and-scatter for `nn.max_pool`. Ties share
    the gradient equally, where torch gives all of it to the first maximum.

    Args:
      x: `[B, *S, C]`.
      window: one size per spatial axis.

    Returns:
      `[B, *(S // window), C]`.
    """
    kept = [n // k * k for n, k in zip(x.shape[1:-1], window, strict=True)]
    x = x[(slice(None), *(slice(0, n) for n in kept))]
    split = [d for n, k in zip(kept, window, strict=True) for d in (n // k, k)]
    x = x.reshape(x.shape[0], *split, x.shape[-1])
    return x.max(axis=tuple(range(2, 2 + 2 * len(window), 2)))


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
        for name in ("features", "kernel_size", "strides", "dilation"):
            check_positive(name, getattr(self, name))
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
    a dot is two to four times as fast as that of a 1x1 convolution. The package's one 1x1
    convolution; `strides` subsamples every spatial axis first (no padding)."""

    features: int
    spatial_dims: int = 2
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    strides: int = 1
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, *S, C]` -> `[B, *ceil(S / strides), features]`."""
        check_positive("features", self.features)
        check_positive("strides", self.strides)
        if self.strides != 1:
            x = x[(slice(None), *(slice(None, None, self.strides),) * self.spatial_dims)]
        shape = (*(1,) * self.spatial_dims, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if (
            self.use_bias) else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.dot(x, kernel.reshape(shape[-2:]), precision=self.precision)
        return y if bias is None else y + bias


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
        PointwiseConv(n, name=name, **numerics(module))(x) for name, n in features.items()
    )


def scaled_residual(module: nn.Module, attended: jax.Array, x: jax.Array) -> jax.Array:
    """`gamma * attended + x` with a learnable `gamma` of shape (1,) that starts at zero (so a
    fresh block is the identity), created in `module`'s scope."""
    gamma = module.param("gamma", nn.initializers.zeros, (1,), module.param_dtype)
    attended, gamma, x = promote_dtype(attended, gamma, x, dtype=module.dtype)
    return gamma * attended + x


def bind_attention_fn(attention_fn: AttentionFn, default: AttentionFn,
                      **options: Any) -> AttentionFn:
    """A module's `attention_fn`, ready to call as `fn(q, k, v, precision=, implementation=)`.

    Args:
      attention_fn: the module's field.
      default: the family's functional op, the field's default.
      **options: the module's other options for `default` (such as `chunk_size`); those not None
        are bound to it.

    Raises:
      ValueError: an option that is not None given together with another `attention_fn`.
    """
    options = {name: value for name, value in options.items() if value is not None}
    if attention_fn is default:
        return functools.partial(default, **options)
    if options:
        raise ValueError(f"{', '.join(options)} apply to the default attention_fn; got "
                         f"{options} with attention_fn={attention_fn!r}")
    return attention_fn
