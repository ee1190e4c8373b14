"""Squeeze-and-Excitation: the SE layer and the SE residual blocks of SE-ResNet / SE-ResNeXt.

Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018; reference code
moskomule/senet.pytorch (`senet/se_module.py`, `senet/se_resnet.py`), whose blocks follow
torchvision's ResNet. NHWC here, NCHW there; parameter names follow the reference so
`flax_attention.interop.torch.from_torch` imports its state dicts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention._checks import check_divisible
from flax_attention.functional import squeeze_excitation_ops as F
from flax_attention.resnet_blocks import BasicBlock, Bottleneck

__all__ = ["SELayer", "SEBasicBlock", "SEBottleneck"]


class SELayer(nn.Module):
    """The squeeze-and-excitation layer (the reference's `SELayer`).

    Global average pool over every spatial axis, `fc_0` (C -> C / reduction, no bias), ReLU,
    `fc_2` (C / reduction -> C, no bias), sigmoid, and each channel scaled by its gate. Works on
    `[B, L, C]`, `[B, H, W, C]` and `[B, T, H, W, C]`. The `[B, C]` gates are sown as
    ("intermediates", "attention").

    Differences from the reference: channels must be divisible by `reduction` (the reference
    floors C / reduction); the gates are computed in float32 under bfloat16.

    Attributes:
      reduction: the hidden layer has C / reduction units.
    """

    reduction: int = 16
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, *S, C]` -> `[B, *S, C]`."""
        F.check_spatial_input("x", x)
        channels = x.shape[-1]
        check_divisible("x channels", channels, self.reduction, "reduction")
        init = nn.initializers.lecun_normal()
        hidden = channels // self.reduction
        w1 = self.param("fc_0", init, (channels, hidden), self.param_dtype)
        w2 = self.param("fc_2", init, (hidden, channels), self.param_dtype)
        x, w1, w2 = promote_dtype(x, w1, w2, dtype=self.dtype)
        gates = F.squeeze_excitation_gates(x, w1, w2, self.precision)
        self.sow("intermediates", "attention", gates)
        return F.excite(x, gates)


class _SEHook:
    """Makes a residual block an SE block: its attention module is `SELayer(reduction)`."""

    @nn.nowrap
    def attention_module(self) -> SELayer:
        return SELayer(self.reduction, self.dtype, self.param_dtype, self.precision, name="se")


class SEBasicBlock(_SEHook, BasicBlock):
    """The SE-ResNet basic block (the reference's `SEBasicBlock`, expansion 1).

    `resnet_blocks.BasicBlock` with the SE layer after its last BN: conv3x3(stride)-BN-ReLU,
    conv3x3-BN, SE, plus the shortcut, ReLU. The shortcut is projected by `downsample` (1x1 conv
    with the block's stride, no bias, then BN) when the stride is not 1 or the input channels
    differ from `planes`, as torchvision's ResNet builds it.

    Differences from the reference: the projection is decided from the input (or forced by
    `use_downsample`) instead of being passed in as a module; `planes` must be divisible by
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
