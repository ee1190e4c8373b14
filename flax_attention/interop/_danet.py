"""DANet: torch -> Flax converters (see torch.py), keys of junfu1115/DANet's `da_att.py`."""

from __future__ import annotations

import jax.numpy as jnp

from flax_attention.danet import ChannelAttention, DANetHead, PositionAttention
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    conv_bn,
    nested,
    param,
    register,
    rules_for,
)


def _nhwc(channels: int) -> tuple[jnp.ndarray]:
    return (jnp.zeros((1, 1, 1, channels), jnp.float32),)


def _pam_rules(module: PositionAttention) -> Rules:
    return (
        conv(("query_conv",), "query_conv")
        | conv(("key_conv",), "key_conv")
        | conv(("value_conv",), "value_conv")
        | param(("gamma",), "gamma")
    )


def _head_rules(module: DANetHead) -> Rules:
    rules = nested(rules_for(PositionAttention()), ("sa",), "sa")
    rules |= nested(rules_for(ChannelAttention()), ("sc",), "sc")
    for name in ("conv5a", "conv5c", "conv51", "conv52"):
        rules |= conv_bn((name,), name)
    for name in ("conv6", "conv7", "conv8"):
        rules |= conv((name,), f"{name}.1")
    return rules


def _pam_inputs(module: PositionAttention, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(shapes["value_conv.weight"][1])


def _cam_inputs(module: ChannelAttention, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(1)  # no weight tells CAM's width; every width has the same (1,) gamma


def _head_inputs(module: DANetHead, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(shapes["conv5a.0.weight"][1])


register(PositionAttention)(Converter(_pam_rules, _pam_inputs))
register(ChannelAttention)(Converter(lambda m: param(("gamma",), "gamma"), _cam_inputs))
register(DANetHead)(Converter(_head_rules, _head_inputs))
