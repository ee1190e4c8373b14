"""DANet: torch -> Flax converters (see torch.py), keys of junfu1115/DANet's `da_att.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attention.danet import ChannelAttention, DANetHead, PositionAttention
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
