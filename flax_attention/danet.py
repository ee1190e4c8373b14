"""DANet: position and channel attention, and the dual-attention segmentation head.

Fu, Liu, Tian, Li, Bao, Fang, Lu: "Dual Attention Network for Scene Segmentation", CVPR 2019;
reference code junfu1115/DANet, `encoding/nn/da_att.py` (`PAM_Module`, `CAM_Module`) and
`encoding/models/sseg/danet.py` (`DANetHead`). NHWC here, NCHW there; parameter names follow the
reference so `flax_attention.interop.torch.from_torch` imports its state dicts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_image, check_positive, check_reducible
from flax_attention.functional import danet as F
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    conv_bn,
    image_input,
    nested,
    param,
    register,
    rules_for,
)

__all__ = ["PositionAttention", "ChannelAttention", "DANetHead"]

# Inter channels of the head: C // 4, as in the reference.
_HEAD_REDUCTION = 4


class PositionAttention(nn.Module):
    """DANet's position attention module (PAM, the reference's `PAM_Module`).

    `query_conv`, `key_conv` (C -> C / reduction) and `value_conv` (C -> C) are 1x1 convolutions
    with bias; `out = gamma * position_attention(q, k, v) + x`, `gamma` starting at zero.

    Differences from the reference: C < `reduction` (no query channel) is refused; above
    `chunk_size` positions the attention runs block by block in O(H * W) memory (the reference
    builds the `[B, L, L]` map), on a GPU by cuDNN or a Pallas flash kernel (`implementation`);
    `attention_fn` can swap in another kernel. The `[B, L, L]` map is sown as ("intermediates",
    "attention") only when that collection is mutable, since it is not otherwise built at large
    sizes.

    Attributes:
      reduction: query/key channels are C // reduction (floored, as the reference's).
      chunk_size: queries per block of `functional.position_attention`; None for its default.
      implementation: None, "xla" or "pallas", as in `functional.position_attention`; passed
        to `attention_fn`.
      attention_fn: `(q, k, v, *, precision, implementation) -> out` on q, k
        `[B, H, W, C / reduction]` and v `[B, H, W, C]`, called with the module's `precision`
        and `implementation`; `functional.position_attention` by default (with `chunk_size`
        bound; another `attention_fn` needs `chunk_size` None).
    """

    reduction: int = 8
    chunk_size: int | None = None
    implementation: str | None = None
    attention_fn: layers.AttentionFn = F.position_attention
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        check_reducible("x channels", x.shape[-1], self.reduction)
        attention_fn = layers.bind_attention_fn(self.attention_fn, F.position_attention,
                                                chunk_size=self.chunk_size)
        q, k, v = layers.query_key_value(self, x, self.reduction)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention",
                     F.position_attention_weights(q, k, precision=self.precision))
        attended = attention_fn(q, k, v, precision=self.precision,
                                implementation=self.implementation)
        return layers.scaled_residual(self, attended, x)


class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM, the reference's `CAM_Module`).

    No projections: `out = gamma * channel_attention(x) + x`, `gamma` starting at zero. As in the
    reference (not the paper), the energies are `rowmax(E) - E` before the softmax. The `[B, C, C]`
    map is sown as ("intermediates", "attention") when that collection is mutable.
    """

    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention",
                     F.channel_attention_weights(x, precision=self.precision))
        return layers.scaled_residual(self, F.channel_attention(x, precision=self.precision), x)


class DANetHead(nn.Module):
    """DANet's dual-attention segmentation head (the reference's `DANetHead`).

    With inter = C // 4: `conv5a` -> `sa` (PAM) -> `conv51` and `conv5c` -> `sc` (CAM) ->
    `conv52` (3x3 conv, no bias, BatchNorm, ReLU each); `conv6`, `conv7` and `conv8` are channel
    dropout (`Dropout2d`) then a 1x1 conv with bias (inter -> out_channels) on the PAM branch, the
    CAM branch and their sum.

    Returns, like the reference, the tuple `(fused, pam_out, cam_out)`: `conv8` of the sum, then
    `conv6` and `conv7` of the branches (DANet trains on all three, infers with the first).
    Differences: C must be at least 32 (inter = C // 4 at least PAM's reduction 8); the
    channel counts are floored, as the reference's.
    Batch statistics are used when `train`, dropout (rng stream "dropout") when not
    `deterministic`.

    Attributes:
      out_channels: output channels (classes) of each of the three outputs.
      dropout: channel dropout rate before `conv6`, `conv7`, `conv8`.
      chunk_size, implementation: of the position attention `sa` (see `PositionAttention`).
    """

    out_channels: int
    dropout: float = 0.1
    chunk_size: int | None = None
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`[B, H, W, C]` -> three `[B, H, W, out_channels]`: (fused, pam_out, cam_out)."""
        kw = layers.numerics(self)
        pam = PositionAttention(chunk_size=self.chunk_size, implementation=self.implementation,
                                name="sa", **kw)
        check_image("x", x)
        check_positive("out_channels", self.out_channels)
        check_reducible("x channels", x.shape[-1], _HEAD_REDUCTION * pam.reduction,
                        "4 * PositionAttention reduction")
        inter = x.shape[-1] // _HEAD_REDUCTION

        def conv_bn(name: str, y: jax.Array) -> jax.Array:
            return layers.ConvBN(inter, 3, name=name, **kw)(y, train)

        def classify(name: str, y: jax.Array) -> jax.Array:
            y = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(y, deterministic)
            return layers.PointwiseConv(self.out_channels, name=name, **kw)(y)

        sa = conv_bn("conv51", pam(conv_bn("conv5a", x)))
        sc = conv_bn("conv52", ChannelAttention(name="sc", **kw)(conv_bn("conv5c", x)))
        return classify("conv8", sa + sc), classify("conv6", sa), classify("conv7", sc)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------

def _pam_rules(module: PositionAttention) -> Rules:
    rules = param(("gamma",), "gamma")
    for name in ("query_conv", "key_conv", "value_conv"):
        rules |= conv((name,), name)
    return rules


def _head_rules(module: DANetHead) -> Rules:
    rules = nested(rules_for(PositionAttention()), ("sa",), "sa")
    rules |= nested(rules_for(ChannelAttention()), ("sc",), "sc")
    for name in ("conv5a", "conv5c", "conv51", "conv52"):
        rules |= conv_bn((name,), name)
    for name in ("conv6", "conv7", "conv8"):
        rules |= conv((name,), f"{name}.1")
    return rules


def _cam_inputs(module: ChannelAttention, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    # No weight tells CAM's width, and every width has the same (1,) gamma.
    return (jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32),)


register(PositionAttention)(
    Converter(_pam_rules, lambda module, shapes: image_input(shapes, "value_conv.weight"))
)
register(ChannelAttention)(Converter(lambda module: param(("gamma",), "gamma"), _cam_inputs))
register(DANetHead)(
    Converter(_head_rules, lambda module, shapes: image_input(shapes, "conv5a.0.weight"))
)
