"""Coordinate attention: channel gates that keep the position along each spatial axis.

Hou, Zhou, Feng: "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021. Two
references, chosen by `variant`:

* "timm": timm 1.0.31 `timm/layers/coord_attn.py` `CoordAttn` (the default): convs without
  bias, hidden width `make_divisible(C * rd_ratio * se_factor, rd_divisor, round_limit=0)`.
* "houqb": the authors' houqb/CoordAttention `coordatt.py` `CoordAtt`: convs with bias, hidden
  width `max(8, C // reduction)`.
* "houqb_mbv2": the same numerics under the names of the `CoordAtt` in that repository's
  `mbv2_ca.py`, whose MobileNetV2 checkpoint calls the gate convs `conv2` and `conv3`.

Both: strip pooling (mean over W of every row, mean over H of every column), the two strips
concatenated through a shared 1x1 conv `conv1` + BatchNorm `bn1` + h-swish, split again, and a
1x1 conv + sigmoid for each (`conv_h`, `conv_w`); out = x * a_w * a_h. timm and `coordatt.py`
share the parameter names (`conv1`, `bn1`, `conv_h`, `conv_w`), `mbv2_ca.py` has `conv2` and
`conv3` for the last two; `interop.torch.from_torch` loads each with its variant. NHWC here,
NCHW there.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_choice, check_declared_channels, check_image
from flax_attention.functional import coord_attention as F
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    image_input,
    register,
)
from flax_attention.layers import make_divisible

__all__ = ["CoordAttention"]

VARIANTS = ("timm", "houqb", "houqb_mbv2")
# The torch names of the gate convs `conv_h`, `conv_w` in each variant's state dict.
_GATE_KEYS = {"timm": ("conv_h", "conv_w"), "houqb": ("conv_h", "conv_w"),
              "houqb_mbv2": ("conv2", "conv3")}


class CoordAttention(nn.Module):
    """Coordinate attention (timm's `CoordAttn`, or houqb's `CoordAtt` with `variant="houqb"`).

    `[B, H, W, C]` -> the same shape. Sown as ("intermediates", ...): "attention", the mean over
    C of `a_h * a_w` `[B, H, W]`; "gate_h" `[B, H, C]` and "gate_w" `[B, W, C]`; all float32
    (float64 under float64).

    Differences from the references: channels are inferred from the input (houqb's `oup`, which
    must equal `inp` for the product to broadcast, is not a field); `norm_layer` is always
    BatchNorm; the gates are computed in float32 under bfloat16.

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      rd_ratio, rd_divisor, se_factor: timm's hidden width
        `make_divisible(C * rd_ratio * se_factor, rd_divisor, round_limit=0)` ("timm" only).
      rd_channels: the hidden width, overriding both variants' rules.
      reduction: houqb's hidden width `max(8, C // reduction)` (`groups` in `mbv2_ca.py`).
      bias: biases on the three convs; None: the variant's (timm False, houqb True).
      act_layer: after `bn1` (h-swish in both references), a name or a callable.
      gate_layer: a name of timm's (`functional.activations.ACTIVATIONS`: "sigmoid",
        "hard_sigmoid", ...) or a callable (timm's `gate_layer`).
      has_skip: add the input to the output (timm's `has_skip`).
      variant: "timm", "houqb" or "houqb_mbv2" (houqb's numerics, `mbv2_ca.py`'s names).
    """

    channels: int | None = None
    _: dataclasses.KW_ONLY
    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    se_factor: float = 2.0 / 3
    reduction: int = 32
    bias: bool | None = None
    act_layer: Activation = jax.nn.hard_swish
    gate_layer: Activation = "sigmoid"
    has_skip: bool = False
    variant: str = "timm"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def hidden_channels(self, channels: int) -> int:
        """The width of `conv1` for `channels` input channels."""
        check_choice("variant", self.variant, VARIANTS)
        if self.rd_channels:
            return self.rd_channels
        if self.variant != "timm":
            return max(8, channels // self.reduction)
        return make_divisible(channels * self.rd_ratio * self.se_factor, self.rd_divisor,
                              round_limit=0.0)

    @nn.nowrap
    def use_bias(self) -> bool:
        check_choice("variant", self.variant, VARIANTS)
        return self.variant != "timm" if self.bias is None else self.bias

    def _conv(self, features: int, name: str) -> layers.PointwiseConv:
        return layers.PointwiseConv(features, use_bias=self.use_bias(), name=name,
                                    **layers.numerics(self))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        check_declared_channels("channels", self.channels, x)
        gate = activation_function(self.gate_layer, "gate_layer")
        height, channels = x.shape[1], x.shape[-1]
        y = self._conv(self.hidden_channels(channels), "conv1")(F.coordinate_pool(x))
        y = layers.batch_norm(train, self.dtype, self.param_dtype, name="bn1")(y)
        y = activation_function(self.act_layer)(y)
        dtype = jnp.promote_types(y.dtype, jnp.float32)
        gate_h = gate(self._conv(channels, "conv_h")(y[:, :height]).astype(dtype))
        gate_w = gate(self._conv(channels, "conv_w")(y[:, height:]).astype(dtype))
        self.sow("intermediates", "attention", F.coordinate_attention_map(gate_h, gate_w,
                                                                          self.precision))
        self.sow("intermediates", "gate_h", gate_h)
        self.sow("intermediates", "gate_w", gate_w)
        out = F.coordinate_excite(x, gate_h.astype(x.dtype), gate_w.astype(x.dtype))
        return out + x if self.has_skip else out


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys: `conv1`, `bn1` and the gate convs, `conv_h`, `conv_w` (timm, houqb's `coordatt.py`) or
# `conv2`, `conv3` (houqb's `mbv2_ca.py`); 1x1 convs, with `.bias` when the module has biases.


def _rules(module: CoordAttention) -> Rules:
    bias = module.use_bias()
    key_h, key_w = _GATE_KEYS[module.variant]
    return (conv(("conv1",), "conv1", bias) | batch_norm(("bn1",), "bn1")
            | conv(("conv_h",), key_h, bias) | conv(("conv_w",), key_w, bias))


def _inputs(module: CoordAttention, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "conv1.weight")


register(CoordAttention)(Converter(_rules, _inputs))
