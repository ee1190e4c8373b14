"""Criss-cross attention (speedinghzl/CCNet): torch -> Flax converters (see torch.py).

`CrissCrossAttention`: `query_conv`, `key_conv`, `value_conv` (1x1 convs with bias), `gamma`.
`RCCAModule`: `conva.0` (conv) / `conva.1` (InPlaceABN: BatchNorm keys), `cca.*`, `convb.0/1`,
`bottleneck.0` (conv), `bottleneck.1` (BatchNorm), `bottleneck.3` (classifier conv, with bias,
only when `num_classes` is set).
"""

from __future__ import annotations

import jax.numpy as jnp

from flax_attention.criss_cross import CrissCrossAttention, RCCAModule
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


def _cca_rules(module: CrissCrossAttention) -> Rules:
    rules = param(("gamma",), "gamma")
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
    return rules


def _cca_inputs(module: CrissCrossAttention, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(shapes["value_conv.weight"][1])


def _rcca_inputs(module: RCCAModule, shapes: Shapes) -> tuple[jnp.ndarray]:
    return _nhwc(shapes["conva.0.weight"][1])


register(CrissCrossAttention)(Converter(_cca_rules, _cca_inputs))
register(RCCAModule)(Converter(_rcca_rules, _rcca_inputs))
