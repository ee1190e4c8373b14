"""CBAM: the convolutional block attention module, as timm's `CbamModule` and
`LightCbamModule`.

Woo, Park, Lee, Kweon: "CBAM: Convolutional Block Attention Module", ECCV 2018
(arXiv:1807.06521); the form and the parameter names are timm 1.0.31's `timm/layers/cbam.py`,
so `flax_attention.interop.torch.from_torch` loads the state dicts of timm's modules (and,
nested, the `se` module of timm's ResNets built with `attn_layer="cbam"` or `"lcbam"`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import check_declared_channels, check_image
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.cbam import cbam
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    image_input,
    register,
)
from flax_attention.layers import ConvBN, PointwiseConv, make_divisible, numerics

__all__ = ["CbamModule", "LightCbamModule"]



class _Cbam(nn.Module):
    """What `CbamModule` and `LightCbamModule` share: the fields but `gate_layer`, the
    parameters and the call."""

    channels: int | None = None
    _: dataclasses.KW_ONLY
    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 1
    spatial_kernel_size: int = 7
    act_layer: Activation = nn.relu
    mlp_bias: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    _light = False

    @nn.nowrap
    def hidden_channels(self, channels: int) -> int:
        """The shared MLP's hidden width for an input of `channels` channels."""
        if self.rd_channels:  # timm: `if not rd_channels`, so 0 also means "from rd_ratio"
            return self.rd_channels
        return make_divisible(channels * self.rd_ratio, self.rd_divisor, round_limit=0.0)

    @nn.nowrap
    def _gate(self) -> Callable[[jax.Array], jax.Array]:
        return nn.sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`; `train` runs the spatial BatchNorm on batch
        statistics (then "batch_stats" must be mutable)."""
        check_image("x", x)
        check_declared_channels("channels", self.channels, x)
        channels = x.shape[-1]
        fc1 = PointwiseConv(self.hidden_channels(channels), use_bias=self.mlp_bias, name="fc1",
                            **numerics(self))
        fc2 = PointwiseConv(channels, use_bias=self.mlp_bias, name="fc2", **numerics(self))
        spatial = ConvBN(1, self.spatial_kernel_size, activation=None, name="spatial",
                         **numerics(self))
        if self.dtype is not None:
            x = x.astype(self.dtype)
        act = activation_function(self.act_layer)
        out, channel_gates, spatial_gates = cbam(
            x, lambda v: fc2(act(fc1(v))), functools.partial(spatial, train=train),
            self._gate(), self._light)
        self.sow("intermediates", "channel_gates", channel_gates)
        self.sow("intermediates", "attention", spatial_gates)
        return out


class CbamModule(_Cbam):
    """CBAM (timm's `CbamModule`): channel attention, then spatial attention.

    Channel attention (timm's `ChannelAttn`, key prefix `channel.`): the spatial mean and the
    spatial max of `x` each go through the same bias-free MLP (`fc1`: C -> rd_channels 1x1
    conv, ReLU, `fc2`: back to C), the two results are summed, and their sigmoid scales the
    channels. Spatial attention (timm's `SpatialAttn`, prefix `spatial.`): the mean and the max
    over the channels of the channel-gated input, stacked (mean first), go through a
    `spatial_kernel_size`^2 conv (2 -> 1, no bias, zero padding (k - 1) // 2) and a BatchNorm
    (`spatial.conv.conv`, `spatial.conv.bn`); their sigmoid scales the positions. The spatial
    gates `[B, H, W]` are sown as ("intermediates", "attention"), the channel gates `[B, C]` as
    "channel_gates" (both float32).

    Differences from timm: `act_layer` and `gate_layer` are timm's names
    (`functional.activations.ACTIVATIONS`) or functions, not module classes; the pools and
    gates run in float32 under bfloat16. The paper's MLP has biases (`mlp_bias=True`) and its
    reduction ratio is 16, as timm's default.

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      rd_ratio: the MLP's hidden width as a fraction of C, when `rd_channels` is not given.
      rd_channels: the MLP's hidden width (None or 0: from `rd_ratio`).
      rd_divisor: the hidden width is rounded to a multiple of this (timm's `make_divisible`,
        `round_limit=0`).
      spatial_kernel_size: of the spatial convolution.
      act_layer: the MLP's activation.
      gate_layer: the gate of both attentions.
      mlp_bias: the MLP's convolutions have biases.
    """

    _: dataclasses.KW_ONLY
    gate_layer: Activation = "sigmoid"

    @nn.nowrap
    def _gate(self) -> Callable[[jax.Array], jax.Array]:
        return activation_function(self.gate_layer, "gate_layer")


class LightCbamModule(_Cbam):
    """timm's experimental light CBAM (`LightCbamModule`): as `CbamModule`, but the channel
    attention runs the MLP once on `0.5 * mean + 0.5 * max` (timm's `LightChannelAttn`), and
    the spatial attention convolves the single map `0.5 * mean + 0.5 * max` over the channels
    (`LightSpatialAttn`: a 1 -> 1 conv + BatchNorm). Both gates are sigmoids; the sown
    intermediates are `CbamModule`'s.

    Differences from timm: no `gate_layer` (timm takes it and uses it for neither gate); the
    other fields are `CbamModule`'s.
    """

    _: dataclasses.KW_ONLY
    _light = True


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are timm's: `channel.fc1.weight`, `channel.fc2.weight` (`.bias` with `mlp_bias`),
# `spatial.conv.conv.weight`, `spatial.conv.bn.*` (`se.*` inside timm's ResNet blocks).


def cbam_rules(module: _Cbam) -> Rules:
    return (conv(("fc1",), "channel.fc1", bias=module.mlp_bias)
            | conv(("fc2",), "channel.fc2", bias=module.mlp_bias)
            | conv(("spatial", "conv"), "spatial.conv.conv", bias=False)
            | batch_norm(("spatial", "bn"), "spatial.conv.bn"))


def _cbam_inputs(module: _Cbam, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "channel.fc1.weight")


register(CbamModule, LightCbamModule)(Converter(cbam_rules, _cbam_inputs))
