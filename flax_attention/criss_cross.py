"""Criss-cross attention modules (Huang et al., "CCNet: Criss-Cross Attention for Semantic
Segmentation", ICCV 2019; reference: speedinghzl/CCNet).

Differences from the reference:
- NHWC; channels are inferred from the input; the projections have `C // 8` and `C // 4`
  channels, floored as the reference's (a projection to no channel is refused).
- CCNet's InPlaceABNSync (BatchNorm fused with its default activation, leaky ReLU of slope
  0.01) is a `layers.ConvBN` with `activation` (default that same leaky ReLU); batch
  statistics are per device, not synchronised. InPlaceABN scales by `|weight| + eps`, so
  `from_torch` loads its weight as that scale (`interop.torch.inplace_abn_scale`).
- `RCCAModule` takes `recurrence` as a field (default 2, the paper's and README's setting; the
  reference's `Seg_Model` defaults to 0, where `cca` keeps its unused parameters, as here) and
  ends with the 1x1 classifier only when `num_classes` is given.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_attention._checks import check_image, check_positive, check_probability, check_reducible
from flax_attention.functional.criss_cross import criss_cross_attention, criss_cross_weights
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    conv_bn,
    inplace_abn,
    nested,
    param,
    register,
    rules_for,
)
from flax_attention.layers import (
    Activation,
    AttentionFn,
    ConvBN,
    PointwiseConv,
    bind_attention_fn,
    numerics,
    query_key_value,
    scaled_residual,
)

__all__ = ["CrissCrossAttention", "RCCAModule"]

leaky_relu = functools.partial(nn.leaky_relu, negative_slope=0.01)


class CrissCrossAttention(nn.Module):
    """CCNet's criss-cross attention block: `gamma * cca(q, k, v) + x`.

    q and k are 1x1 convolutions to `C // reduction` channels, v a 1x1 convolution to C (all
    with bias); `gamma` has shape (1,) and starts at zero, so a fresh block is the identity.
    With the "intermediates" collection mutable, the weights `[B, H, W, H+W-1]` (CUDA order)
    are sown as "attention" (computed only then).

    Attributes:
      reduction: channel reduction of the query and key projections.
      attention_fn: `(q, k, v, *, precision, implementation) -> out` on q, k
        `[B, H, W, C / reduction]` and v `[B, H, W, C]`, called with the module's `precision`
        and `implementation`; `functional.criss_cross_attention` by default, the slot for
        another kernel.
      implementation: passed to `attention_fn`: "xla", "pallas" or None (XLA).
    """

    reduction: int = 8
    attention_fn: AttentionFn = criss_cross_attention
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        check_reducible("channels of x", x.shape[-1], self.reduction)
        q, k, v = query_key_value(self, x, self.reduction)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention", criss_cross_weights(q, k, self.precision))
        attention_fn = bind_attention_fn(self.attention_fn, criss_cross_attention)
        out = attention_fn(q, k, v, precision=self.precision, implementation=self.implementation)
        return scaled_residual(self, out, x)


class RCCAModule(nn.Module):
    """CCNet's recurrent criss-cross head.

    conva (3x3 conv to C/4, BatchNorm, activation), the SAME `CrissCrossAttention` applied
    `recurrence` times (shared weights), convb (3x3, C/4), then the bottleneck on
    `concat(x, convb)`: 3x3 conv to `out_channels`, BatchNorm, activation, Dropout2d, and a
    1x1 conv (with bias) to `num_classes` when given.

    Attributes:
      out_channels: channels of the bottleneck.
      num_classes: channels of the final 1x1 classifier; None for no classifier.
      recurrence: how many times the criss-cross block is applied (2 in the paper).
      dropout: Dropout2d rate (whole channels) after the bottleneck.
      reduction: query/key channel reduction inside the criss-cross block.
      activation: applied after every BatchNorm (InPlaceABN's default: leaky ReLU, 0.01).
      implementation: of the criss-cross attention: "xla", "pallas" or None (XLA).
    """

    out_channels: int = 512
    num_classes: int | None = None
    recurrence: int = 2
    dropout: float = 0.1
    reduction: int = 8
    activation: Activation = leaky_relu
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, deterministic: bool = True):
        """`[B, H, W, C]` -> `[B, H, W, num_classes or out_channels]`."""
        check_image("x", x)
        check_reducible("channels of x", x.shape[-1], 4 * self.reduction, "4 * reduction")
        check_positive("out_channels", self.out_channels)
        check_positive("recurrence", self.recurrence, minimum=0)
        check_probability("dropout", self.dropout)
        inter = x.shape[-1] // 4
        conv_bn = functools.partial(ConvBN, activation=self.activation, **numerics(self))
        out = conv_bn(inter, name="conva")(x, train)
        cca = CrissCrossAttention(self.reduction, implementation=self.implementation,
                                  name="cca", **numerics(self))
        for _ in range(self.recurrence):
            out = cca(out)
        if self.recurrence == 0 and self.is_initializing():
            cca(out)  # its parameters exist unused, as in the reference (and its checkpoints)
        out = conv_bn(inter, name="convb")(out, train)
        out = conv_bn(self.out_channels, name="bottleneck")(
            jnp.concatenate([x, out], axis=-1), train
        )
        out = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(out, deterministic)
        if self.num_classes is None:
            return out
        return PointwiseConv(self.num_classes, name="classifier", **numerics(self))(out)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# `CrissCrossAttention`: `query_conv`, `key_conv`, `value_conv` (1x1 convs with bias), `gamma`
# (CCNet's, shape (1,)) or `gamma.scale` (mmcv/mmseg's `Scale`, 0-d).
# `RCCAModule`: `conva.0` (conv) / `conva.1` (InPlaceABN: BatchNorm keys, the weight read as
# `|weight| + eps`), `cca.*`, `convb.0/1`, `bottleneck.0` (conv), `bottleneck.1` (InPlaceABN),
# `bottleneck.3` (classifier conv, with bias, only when `num_classes` is set).

def _nhwc(channels: int) -> tuple[jnp.ndarray]:
    return (jnp.zeros((1, 1, 1, channels), jnp.float32),)


def _gamma_vector(a: np.ndarray) -> np.ndarray:
    """mmcv's 0-d `gamma.scale` -> shape (1,); CCNet's `gamma` as it is."""
    return a.reshape(1) if a.ndim == 0 else a


def _cca_rules(module: CrissCrossAttention) -> Rules:
    rules = param(("gamma",), "gamma", _gamma_vector, aliases=("gamma.scale",))
    for name in ("query_conv", "key_conv", "value_conv"):
        rules |= conv((name,), name)
    return rules


def _rcca_rules(module: RCCAModule) -> Rules:
    cca = CrissCrossAttention(module.reduction)
    rules = nested(rules_for(cca), ("cca",), "cca")
    for name in ("conva", "convb", "bottleneck"):
        rules |= conv_bn((name,), name)
    if module.num_classes is not None:
        rules |= conv(("classifier",), "bottleneck.3")
    return inplace_abn(rules)


def _cca_inputs(module: CrissCrossAttention, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(shapes["value_conv.weight"][1])


def _rcca_inputs(module: RCCAModule, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(shapes["conva.0.weight"][1])


register(CrissCrossAttention)(Converter(_cca_rules, _cca_inputs))
register(RCCAModule)(Converter(_rcca_rules, _rcca_inputs))
