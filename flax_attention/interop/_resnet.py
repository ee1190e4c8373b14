"""resnet: torch -> Flax converters (see torch.py).

Keys are torchvision's ResNet names (`conv1`, `bn1`, `layer<k>.<n>.{conv1,bn1,...}`,
`layer<k>.<n>.downsample.{0,1}`, `fc`), with moskomule/senet.pytorch's `se.fc.*` inside the blocks
of SE-ResNets.
"""

from __future__ import annotations

import jax.numpy as jnp

from flax_attention.interop._squeeze_excitation import _has_downsample, in_channels
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    conv_bn,
    dense,
    nested,
    register,
    rules_for,
)
from flax_attention.models.resnet import BasicBlock, Bottleneck, ResNet, block_specs


def _block_rules(module: BasicBlock | Bottleneck) -> Rules:
    rules: Rules = {}
    for index in range(1, module.num_convs + 1):
        rules |= conv((f"conv{index}",), f"conv{index}", bias=False)
        rules |= batch_norm((f"bn{index}",), f"bn{index}")
    if module.attention is not None:
        rules |= nested(rules_for(module.attention()), ("se",), "se")
    if _has_downsample(module):
        rules |= conv_bn(("downsample",), "downsample")
    return rules


def _block_inputs(module: BasicBlock | Bottleneck, shapes: Shapes) -> tuple[jnp.ndarray]:
    del module
    return (jnp.zeros((1, 8, 8, in_channels(shapes, "conv1.weight"))),)


register(BasicBlock, Bottleneck)(Converter(_block_rules, _block_inputs))


def _resnet_rules(module: ResNet) -> Rules:
    rules = conv(("conv1",), "conv1", bias=False) | batch_norm(("bn1",), "bn1")
    for spec in block_specs(module):
        block = module.block_cls(**spec.kwargs)
        rules |= nested(rules_for(block), (spec.name,), spec.torch_prefix)
    if not module.features_only:
        rules |= dense(("fc",), "fc")
    return rules


def _resnet_inputs(module: ResNet, shapes: Shapes) -> tuple[jnp.ndarray]:
    del module
    return (jnp.zeros((1, 32, 32, in_channels(shapes, "conv1.weight"))),)


register(ResNet)(Converter(_resnet_rules, _resnet_inputs))
