"""resnet: torch -> Flax converters (see torch.py).

Keys are torchvision's ResNet names (`conv1`, `bn1`, `layer<k>.<n>.{conv1,bn1,...}`,
`layer<k>.<n>.downsample.{0,1}`, `fc`), with moskomule/senet.pytorch's `se.fc.*` inside the blocks
of SE-ResNets.
"""

from __future__ import annotations

import jax

from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    conv_bn,
    dense,
    image_input,
    nested,
    register,
    rules_for,
)
from flax_attention.models.resnet import ResNet, block_specs
from flax_attention.resnet_blocks import ResidualBlock


def _has_downsample(module: ResidualBlock) -> bool:
    if module.use_downsample is not None:
        return module.use_downsample
    if module.stride != 1:
        return True
    raise ValueError(
        f"from_torch cannot tell whether {type(module).__name__}(stride=1) has a `downsample` "
        "projection before seeing the input channels: set use_downsample=True or False"
    )


def _block_rules(module: ResidualBlock) -> Rules:
    rules: Rules = {}
    for index in range(1, module.num_convs + 1):
        rules |= conv((f"conv{index}",), f"conv{index}", bias=False)
        rules |= batch_norm((f"bn{index}",), f"bn{index}")
    attention = module.attention_module()
    if attention is not None:
        rules |= nested(rules_for(attention), ("se",), "se")
    if _has_downsample(module):
        rules |= conv_bn(("downsample",), "downsample")
    return rules


def _block_inputs(module: ResidualBlock, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "conv1.weight", side=8)


register(ResidualBlock)(Converter(_block_rules, _block_inputs))


def _resnet_rules(module: ResNet) -> Rules:
    rules = conv(("conv1",), "conv1", bias=False) | batch_norm(("bn1",), "bn1")
    for spec in block_specs(module):
        block = module.block_cls(**spec.kwargs)
        rules |= nested(rules_for(block), (spec.name,), spec.torch_prefix)
    if not module.features_only:
        rules |= dense(("fc",), "fc")
    return rules


def _resnet_inputs(module: ResNet, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    del module
    return image_input(shapes, "conv1.weight", side=32)


register(ResNet)(Converter(_resnet_rules, _resnet_inputs))
