"""senet.pytorch's CIFAR SE-ResNets (moskomule/senet.pytorch, senet/se_resnet.py:
`CifarSEResNet`, `CifarSEBasicBlock`, `se_resnet20/32/56`).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2's CIFAR
ResNets (6n + 2 layers: a 3x3 stem to 16 channels, three stages of n basic blocks with 16, 32
and 64 channels, the last two starting with stride 2), with Hu et al.'s SE layer ("Squeeze-and-
Excitation Networks", CVPR 2018) after each block's last BatchNorm. The state dict keys are the
reference's (`conv1`, `bn1`, `layer<k>.<n>.{conv1,bn1,conv2,bn2,se.fc.0,se.fc.2,downsample.0,
downsample.1}`, `fc`), so `from_torch(create("se_resnet20"), state_dict)` loads it whole.

Differences from the reference: `se_resnet110` (n = 18) is not defined upstream (only 20, 32
and 56 are); it is the same `CifarSEResNet` with 18 blocks a stage. Channels must be divisible
by the SE reduction (16 divides 16, 32 and 64; the reference floors).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_image, check_positive
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    dense,
    image_input,
    nested,
    register,
    rules_for,
)
from flax_attention.resnet_blocks import BasicBlock
from flax_attention.squeeze_excitation import SELayer

__all__ = ["CifarSEResNet", "se_resnet20", "se_resnet32", "se_resnet56", "se_resnet110"]

_WIDTHS = (16, 32, 64)


def _blocks(net: CifarSEResNet) -> list[tuple[str, str, dict]]:
    """(Flax name, torch prefix, `BasicBlock` fields) of every block in order, as
    `_make_layer` builds them: stage k's first block has stride 2 (k > 0) and projects the
    shortcut when the channels change."""
    check_positive("n_size", net.n_size)
    blocks, inplanes = [], _WIDTHS[0]
    for k, planes in enumerate(_WIDTHS):
        for n in range(net.n_size):
            stride = 2 if k and not n else 1
            kwargs = dict(planes=planes, stride=stride, attention=functools.partial(
                SELayer, reduction=net.reduction), use_downsample=inplanes != planes,
                **layers.numerics(net))
            blocks.append((f"layer{k + 1}_{n}", f"layer{k + 1}.{n}", kwargs))
            inplanes = planes
    return blocks


class CifarSEResNet(nn.Module):
    """senet.pytorch's `CifarSEResNet(CifarSEBasicBlock, n_size)`: conv1 (3x3, 16 channels,
    stride 1)-bn1-ReLU, `layer1`..`layer3` of `n_size` SE basic blocks (16, 32, 64 channels),
    global average pool, `fc`. Initialisation is Flax's default (the reference's is Kaiming
    normal for the convs).

    Attributes:
      n_size: blocks per stage (3, 5, 9 for se_resnet20/32/56).
      num_classes: outputs of `fc` (10: CIFAR-10).
      reduction: of every SE layer.
    """

    n_size: int
    num_classes: int = 10
    reduction: int = 16
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, num_classes]` logits."""
        check_image("x", x)
        x = nn.Conv(_WIDTHS[0], (3, 3), padding=[(1, 1)] * 2, use_bias=False, name="conv1",
                    **layers.numerics(self))(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, self.param_dtype, name="bn1")(x))
        for name, _, kwargs in _blocks(self):
            x = BasicBlock(**kwargs, name=name)(x, train)
        pooled = layers.global_average_pool(x)
        return nn.Dense(self.num_classes, name="fc", **layers.numerics(self))(pooled)


se_resnet20 = functools.partial(CifarSEResNet, n_size=3)
se_resnet32 = functools.partial(CifarSEResNet, n_size=5)
se_resnet56 = functools.partial(CifarSEResNet, n_size=9)
se_resnet110 = functools.partial(CifarSEResNet, n_size=18)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------

def _rules(module: CifarSEResNet) -> Rules:
    rules = conv(("conv1",), "conv1", bias=False) | batch_norm(("bn1",), "bn1")
    for name, prefix, kwargs in _blocks(module):
        rules |= nested(rules_for(BasicBlock(**kwargs)), (name,), prefix)
    return rules | dense(("fc",), "fc")


def _inputs(module: CifarSEResNet, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, "conv1.weight", side=8)


register(CifarSEResNet)(Converter(_rules, _inputs))
