"""Squeeze-and-Excitation: the SE layer and the SE residual blocks of SE-ResNet / SE-ResNeXt.

Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018; reference code
moskomule/senet.pytorch (`senet/se_module.py`, `senet/se_resnet.py`), whose blocks follow
torchvision's ResNet. NHWC here, NCHW there; parameter names follow the reference so
`flax_attention.interop.torch.from_torch` imports its state dicts.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_declared_channels, check_image
from flax_attention.eca import ConvParams
from flax_attention.functional.activations import Activation
from flax_attention.functional.squeeze_excitation import (
    check_spatial_input,
    excite,
    squeeze_excitation_gates,
)
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    dense_kernel,
    image_input,
    param,
    register,
)
from flax_attention.layers import make_divisible
from flax_attention.resnet_blocks import BasicBlock, Bottleneck

__all__ = ["SELayer", "SEBasicBlock", "SEBottleneck", "SEModule"]


class SELayer(nn.Module):
    """The squeeze-and-excitation layer (the reference's `SELayer`).

    Global average pool over every spatial axis, `fc_0` (C -> C // reduction, no bias), ReLU,
    `fc_2` (C // reduction -> C, no bias), sigmoid, and each channel scaled by its gate. Works
    on `[B, L, C]`, `[B, H, W, C]` and `[B, T, H, W, C]`. The `[B, C]` gates are sown as
    ("intermediates", "attention").

    Differences from the reference: C < reduction (no hidden unit: gates of 0.5) is refused; the
    gates are computed in float32 under bfloat16.

    Attributes:
      reduction: the hidden layer has C // reduction units (floored, as the reference's).
    """

    reduction: int = 16
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, *S, C]` -> `[B, *S, C]`."""
        check_spatial_input("x", x)
        channels = x.shape[-1]
        if channels < self.reduction:
            raise ValueError(f"x channels ({channels}) must be at least reduction "
                             f"({self.reduction}): the hidden layer has C // reduction units")
        init = nn.initializers.lecun_normal()
        hidden = channels // self.reduction
        w1 = self.param("fc_0", init, (channels, hidden), self.param_dtype)
        w2 = self.param("fc_2", init, (hidden, channels), self.param_dtype)
        x, w1, w2 = promote_dtype(x, w1, w2, dtype=self.dtype)
        gates = squeeze_excitation_gates(x, w1, w2, self.precision)
        self.sow("intermediates", "attention", gates)
        return excite(x, gates)


class SEModule(nn.Module):
    """The squeeze-and-excitation layer in timm's form (`timm/layers/squeeze_excite.py`,
    `SEModule`, the `attn_layer='se'` of timm's SE-ResNets).

    Global average pool (with `add_maxpool`, the mean of it and the global max), `fc1` (1x1 conv
    C -> R with bias), ReLU, `fc2` (1x1 conv R -> C with bias), sigmoid, each channel scaled by
    its gate; R = `rd_channels` or `make_divisible(C * rd_ratio, rd_divisor, round_limit=0)`.
    The `[B, C]` gates are sown as ("intermediates", "attention").

    Differences from timm: C is read from the input; timm's `norm_layer` (a norm between `fc1`
    and the activation, unused by its networks) is left out; the gates are computed in float32
    under bfloat16.

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      rd_ratio, rd_channels, rd_divisor: the hidden width R.
      add_maxpool: squeeze with `(mean + max) / 2` (timm's option).
      bias: of both 1x1 convolutions.
      act_layer, gate_layer: timm's names (`functional.activations.ACTIVATIONS`) or functions.
    """

    channels: int | None = None
    _: dataclasses.KW_ONLY
    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    add_maxpool: bool = False
    bias: bool = True
    act_layer: Activation = "relu"
    gate_layer: Activation = "sigmoid"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def hidden_for(self, channels: int) -> int:
        """R for C = `channels`."""
        if self.rd_channels:
            return self.rd_channels
        return make_divisible(channels * self.rd_ratio, self.rd_divisor, round_limit=0.0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        check_declared_channels("channels", self.channels, x)
        channels = x.shape[-1]
        hidden = self.hidden_for(channels)
        w1, b1 = ConvParams((1, 1, channels, hidden), self.bias, self.param_dtype, name="fc1")()
        w2, b2 = ConvParams((1, 1, hidden, channels), self.bias, self.param_dtype, name="fc2")()
        x, w1, b1, w2, b2 = promote_dtype(x, w1, b1, w2, b2, dtype=self.dtype)
        gates = squeeze_excitation_gates(x, w1.reshape(channels, hidden),
                                         w2.reshape(hidden, channels), self.precision, b1, b2,
                                         add_maxpool=self.add_maxpool, act=self.act_layer,
                                         gate=self.gate_layer)
        self.sow("intermediates", "attention", gates)
        return excite(x, gates)


class _SEHook:
    """Makes a residual block an SE block: its attention module is `SELayer(reduction)`."""

    @nn.nowrap
    def attention_module(self) -> SELayer:
        return SELayer(self.reduction, name="se", **layers.numerics(self))


class SEBasicBlock(_SEHook, BasicBlock):
    """The SE-ResNet basic block (the reference's `SEBasicBlock`, expansion 1).

    `resnet_blocks.BasicBlock` with the SE layer after its last BN: conv3x3(stride)-BN-ReLU,
    conv3x3-BN, SE, plus the shortcut, ReLU. The shortcut is projected by `downsample` (1x1 conv
    with the block's stride, no bias, then BN) when the stride is not 1 or the input channels
    differ from `planes`, as torchvision's ResNet builds it.

    Differences from the reference: the projection is decided from the input (or forced by
    `use_downsample`) instead of being passed in as a module; `planes` must be at least
    `reduction`.

    Attributes:
      reduction: of the SE layer; the other fields are `BasicBlock`'s.
    """

    reduction: int = 16


class SEBottleneck(_SEHook, Bottleneck):
    """The SE-ResNet / SE-ResNeXt bottleneck block (the reference's `SEBottleneck`, expansion 4).

    `resnet_blocks.Bottleneck` with the SE layer after its last BN: conv1x1-BN-ReLU, grouped
    conv3x3(stride)-BN-ReLU, conv1x1-BN, SE, plus the shortcut, ReLU. `groups=32,
    base_width=4` gives the SE-ResNeXt-50 (32x4d) block; the defaults give SE-ResNet's.

    Differences from the reference: as `SEBasicBlock`; `groups`, `base_width` and `dilation`
    are added.

    Attributes:
      reduction: of the SE layer (applied to 4 * planes channels); the other fields are
        `Bottleneck`'s.
    """

    reduction: int = 16


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are moskomule/senet.pytorch's: `fc.0.weight`, `fc.2.weight` for `SELayer` (`se.fc.*` in
# the blocks, whose converter is the residual blocks' one in `_resnet.py`).

def se_layer_rules(module: SELayer) -> Rules:
    del module
    return param(("fc_0",), "fc.0.weight", dense_kernel) | param(
        ("fc_2",), "fc.2.weight", dense_kernel
    )


def _se_layer_inputs(module: SELayer, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "fc.0.weight")


register(SELayer)(Converter(se_layer_rules, _se_layer_inputs))


# timm's keys for `SEModule`: `fc1.weight` `[R, C, 1, 1]`, `fc2.weight` `[C, R, 1, 1]` and their
# biases (`se.fc1.*` in timm's ResNet blocks).

def se_module_rules(module: SEModule) -> Rules:
    return conv(("fc1",), "fc1", module.bias) | conv(("fc2",), "fc2", module.bias)


def _se_module_inputs(module: SEModule, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "fc1.weight")


register(SEModule)(Converter(se_module_rules, _se_module_inputs))
