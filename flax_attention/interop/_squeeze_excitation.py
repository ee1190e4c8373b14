"""squeeze_excitation: torch -> Flax converters (see torch.py).

Keys are moskomule/senet.pytorch's: `fc.0.weight`, `fc.2.weight` for `SELayer`; torchvision's
ResNet block names (`conv1`, `bn1`, ..., `downsample.0`, `downsample.1`) with `se.fc.*` for the
blocks.
"""

from __future__ import annotations

import jax.numpy as jnp

from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    conv_bn,
    dense_kernel,
    nested,
    param,
    register,
)
from flax_attention.squeeze_excitation import SEBasicBlock, SEBottleneck, SELayer


def in_channels(shapes: Shapes, key: str) -> int:
    """The input channels of the torch conv or linear weight `key` (`[O, I, *K]`)."""
    shape = shapes[key]
    if len(shape) < 2:
        raise ValueError(f"state_dict has misshaped keys: {key}: expected [O, I, ...], got {shape}")
    return shape[1]


def se_layer_rules(module: SELayer) -> Rules:
    del module
    return param(("fc_0",), "fc.0.weight", dense_kernel) | param(
        ("fc_2",), "fc.2.weight", dense_kernel
    )


def _se_layer_inputs(module: SELayer, shapes: Shapes) -> tuple[jnp.ndarray]:
    del module
    return (jnp.zeros((1, 1, 1, in_channels(shapes, "fc.0.weight"))),)


register(SELayer)(Converter(se_layer_rules, _se_layer_inputs))


def _has_downsample(module: SEBasicBlock | SEBottleneck) -> bool:
    if module.use_downsample is not None:
        return module.use_downsample
    if module.stride != 1:
        return True
    raise ValueError(
        f"from_torch cannot tell whether {type(module).__name__}(stride=1) has a `downsample` "
        "projection before seeing the input channels: set use_downsample=True or False"
    )


def _block_rules(module: SEBasicBlock | SEBottleneck) -> Rules:
    rules = nested(se_layer_rules(module), ("se",), "se")
    for index in range(1, 4 if isinstance(module, SEBottleneck) else 3):
        rules |= conv((f"conv{index}",), f"conv{index}", bias=False)
        rules |= batch_norm((f"bn{index}",), f"bn{index}")
    if _has_downsample(module):
        rules |= conv_bn(("downsample",), "downsample")
    return rules


def _block_inputs(module: SEBasicBlock | SEBottleneck, shapes: Shapes) -> tuple[jnp.ndarray]:
    del module
    return (jnp.zeros((1, 8, 8, in_channels(shapes, "conv1.weight"))),)


register(SEBasicBlock, SEBottleneck)(Converter(_block_rules, _block_inputs))
