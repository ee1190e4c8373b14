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
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.normalization import _compute_stats  # private; this signature since flax 0.10

from flax_attention._checks import check_positive
from flax_attention.functional.squeeze_excitation import spatial_mean

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


# torch's default init of `nn.Linear` and `nn.ConvNd` weights, `kaiming_uniform_(a=sqrt(5))`:
# U(+-1 / sqrt(fan_in)), fan_in = the input features times the kernel's taps (Flax's fan_in of
# a `[..., I, O]` kernel).
TORCH_KERNEL = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def global_average_pool(x: jax.Array) -> jax.Array:
    """The mean over the spatial axes, `[B, *S, C]` -> `[B, C]`, accumulated in at least
    float32 (float64 stays float64) and returned in x's dtype: a classifier's head pool."""
    return spatial_mean(x, jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)


def torch_linear_bias(fan_in: int) -> Callable:
    """torch's default bias init of `nn.Linear` and `nn.ConvNd`: U(+-1 / sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose training step is torch's `BatchNormNd`'s (`batch_norm` builds it).

    Why: torch parity, so that a training step and its running statistics match PyTorch's.
    Fields, variables ("params": scale, bias; "batch_stats": mean, var) and evaluation
    (`use_running_average=True`) are `nn.BatchNorm`'s. In training:

    - the output is normalised with the biased batch variance, two-pass (`E[(x - E[x])^2]`,
      at least float32): the default here is `use_fast_variance=False`, as Flax's one-pass
      `E[x^2] - E[x]^2` loses the variance of data with a large mean;
    - the running mean takes the batch mean (`momentum` keeps Flax's meaning: 0.9 is torch's
      `momentum=0.1`), the running variance the UNBIASED batch variance (times n / (n - 1),
      n the elements a channel reduces: over `axis_name` too, only the unmasked with `mask`);
    - a channel of a single value is refused, as torch does (not in `init`, whose input, as
      for `nn.BatchNorm`, only gives the shapes: the statistics do not change there).
    """

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """`[B, *S, C]` -> `[B, *S, C]` (C: the features on `axis`); see `nn.BatchNorm`.

        Raises:
          ValueError: in training (not `init`), `x` has a single value per channel (e.g.
            `[1, 1, 1, C]`).
        """
        train = not nn.merge_param("use_running_average", self.use_running_average,
                                   use_running_average)
        features = {a % x.ndim for a in (self.axis if isinstance(self.axis, Sequence)
                                         else (self.axis,))}
        axes = tuple(a for a in range(x.ndim) if a not in features)
        update = train and not self.is_initializing()  # init's input only gives the shapes
        if update and mask is None and self.axis_name is None and all(
                x.shape[a] == 1 for a in axes):
            raise ValueError("x: expected more than 1 value per channel when training, got "
                             f"shape {tuple(x.shape)}")
        old = self.get_variable("batch_stats", "var") if update else None
        y = super().__call__(x, use_running_average, mask=mask)  # stores the biased variance
        if update:
            self.put_variable("batch_stats", "var", self.momentum * old
                              + (1 - self.momentum) * self._unbiased_var(x, axes, mask))
        return y

    def _unbiased_var(self, x: jax.Array, axes: tuple[int, ...],
                      mask: jax.Array | None) -> jax.Array:
        """The batch variance of the parent's training call (the same expression, so one
        computation under jit) times n / (n - 1): `[C]`."""
        _, var = _compute_stats(
            x, axes, self.dtype, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, use_fast_variance=self.use_fast_variance,
            mask=mask, force_float32_reductions=self.force_float32_reductions)
        count = (math.prod(x.shape[a] for a in axes) if mask is None
                 else jnp.sum(jnp.broadcast_to(mask, x.shape), axes))
        if self.axis_name is not None:
            count = jax.lax.psum(count, self.axis_name, axis_index_groups=self.axis_index_groups)
        return var * (count / (count - 1))


def batch_norm(train: bool, dtype, param_dtype, name: str | None = None, **kwargs) -> BatchNorm:
    """A `BatchNorm` (torch's training statistics) with PyTorch's defaults (momentum 0.1, eps
    1e-5); statistics in float32. `kwargs`: other `nn.BatchNorm` fields (`scale_init`, ...)."""
    return BatchNorm(
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
      scale_init: of the BatchNorm's scale (zeros: timm's `zero_init_last` blocks).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    activation: Activation = nn.relu
    scale_init: nn.initializers.Initializer = nn.initializers.ones
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
        x = batch_norm(train, self.dtype, self.param_dtype, name="bn",
                       scale_init=self.scale_init)(x)
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
