"""Effective Squeeze-Excitation (eSE).

Lee, Park: "CenterMask: Real-Time Anchor-Free Instance Segmentation", CVPR 2020 (the eSE of
VoVNetV2); here in the form of timm's `timm/layers/squeeze_excite.py` (`EffectiveSEModule`,
timm 1.0.31), whose parameter names `from_torch` reads. Squeeze-and-excitation with one fully
connected layer C -> C (a 1x1 convolution `fc` with bias) instead of two around a reduction, so
no channel information is lost, and a hard sigmoid gate.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention._checks import check_declared_channels, check_image
from flax_attention.eca import ConvParams
from flax_attention.functional import effective_se as F
from flax_attention.functional.activations import Activation
from flax_attention.functional.squeeze_excitation import excite
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    image_input,
    register,
)

__all__ = ["EffectiveSEModule"]


class EffectiveSEModule(nn.Module):
    """Effective squeeze-excitation (timm's `EffectiveSEModule`).

    `x * hard_sigmoid(fc(mean(x)))`, `fc` a 1x1 convolution C -> C with bias and
    `hard_sigmoid(z) = relu6(z + 3) / 6`. The `[B, C]` float32 gates are sown as
    ("intermediates", "attention").

    Differences from timm: the gates are computed in float32 under bfloat16.

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      add_maxpool: squeeze with `0.5 mean + 0.5 max` (timm's experimental option).
      gate_layer: a name of timm's (`functional.activations.ACTIVATIONS`) or a callable.
    """

    channels: int | None = None
    _: dataclasses.KW_ONLY
    add_maxpool: bool = False
    gate_layer: Activation = "hard_sigmoid"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        check_declared_channels("channels", self.channels, x)
        channels = x.shape[-1]
        kernel, bias = ConvParams((1, 1, channels, channels), True, self.param_dtype,
                                  name="fc")()
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        gates = F.effective_se_gates(x, kernel.reshape(channels, channels), bias,
                                     add_maxpool=self.add_maxpool, gate=self.gate_layer,
                                     precision=self.precision)
        self.sow("intermediates", "attention", gates)
        return excite(x, gates.astype(x.dtype))


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# timm's keys: `fc.weight` `[C, C, 1, 1]`, `fc.bias` `[C]`.

def effective_se_rules(module: EffectiveSEModule) -> Rules:
    del module
    return conv(("fc",), "fc")


def _effective_se_inputs(module: EffectiveSEModule, shapes: Shapes
                         ) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "fc.weight")


register(EffectiveSEModule)(Converter(effective_se_rules, _effective_se_inputs))
