"""spatial_transformer: torch -> Flax converters (see torch.py).

The PyTorch STN tutorial's keys: `localization.0`, `localization.3` (convolutions), `fc_loc.0`
(Linear(90, 32), part of `LocalizationNet` here) and `fc_loc.2` (Linear(32, 6), the
`SpatialTransformer`'s own `fc_loc`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from flax_attention.interop.torch import Converter, Rules, Shapes, conv, dense, register
from flax_attention.spatial_transformer import LocalizationNet, SpatialTransformer


def _localization(module: SpatialTransformer) -> LocalizationNet:
    if not isinstance(module.localization, LocalizationNet):
        raise TypeError(
            "from_torch imports a SpatialTransformer only with a LocalizationNet (the STN "
            f"tutorial's), got localization {type(module.localization).__name__}"
        )
    return module.localization


def _conv_keys(net: LocalizationNet) -> list[str]:
    """The tutorial's Sequential indices of the convolutions (each followed by pool and ReLU)."""
    return [f"localization.{3 * i}" for i in range(len(net.features))]


def _rules(module: SpatialTransformer) -> Rules:
    net = _localization(module)
    rules = dense(("fc_loc",), "fc_loc.2") | dense(("localization", "fc_loc_0"), "fc_loc.0")
    for key in _conv_keys(net):
        rules |= conv(("localization", f"conv_{key.split('.')[1]}"), key)
    return rules


def _dim(shapes: Shapes, key: str, axis: int, default: int) -> int:
    """`shapes[key][axis]`, or `default` if that shape is too short (reported as misshaped)."""
    shape = shapes[key]
    return shape[axis] if len(shape) > axis else default


def _example_inputs(module: SpatialTransformer, shapes: Shapes) -> tuple[jnp.ndarray]:
    """An image with the state dict's input channels whose size gives `fc_loc.0`'s inputs.

    The flattened features are (last conv's channels) x side x side; the input side is found by
    undoing each pool (x 2) and valid convolution (+ kernel - 1)."""
    net = _localization(module)
    keys = _conv_keys(net)
    channels = _dim(shapes, f"{keys[0]}.weight", 1, 1)
    last = max(_dim(shapes, f"{keys[-1]}.weight", 0, 1), 1)
    side = max(math.isqrt(_dim(shapes, "fc_loc.0.weight", 1, last) // last), 1)
    for kernel in reversed(net.kernel_sizes):
        side = 2 * side + kernel - 1
    return (jnp.zeros((1, side, side, channels), jnp.float32),)


register(SpatialTransformer)(Converter(_rules, _example_inputs))
