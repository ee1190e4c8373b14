"""timm's ResNets with attention: SE-, ECA-, CBAM- and Selective-Kernel ResNets.

The networks of timm 1.0.31's `timm/models/resnet.py` (`seresnet50`, `ecaresnet50d`, ...) and
`timm/models/sknet.py` (`skresnet18`, `skresnet34`), as `functools.partial`s of the one
`ResNet`: timm's ResNet is torchvision's with options, and its state dict keys are torchvision's
(`conv1`, `bn1`, `layer<k>.<n>.*`, `fc`) with the attention at `se` and, in the "d"/"t" models,
the deep stem `conv1.{0,1,3,4,6}` and the avg-pool shortcut `downsample.{1,2}` (`ResNet`'s
`stem_type`, `stem_width`, `avg_down`). So `from_torch(create("seresnet50"),
timm_model.state_dict())` loads a timm model whole. Papers: Hu et al., "Squeeze-and-Excitation
Networks" (CVPR 2018); Wang et al., "ECA-Net" (CVPR 2020); Woo et al., "CBAM" (ECCV 2018); Li et
al., "Selective Kernel Networks" (CVPR 2019); He et al., "Bag of Tricks for Image
Classification" (CVPR 2019) for the "d" stem and shortcut.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from flax_attention import layers
from flax_attention.cbam import CbamModule
from flax_attention.eca import EcaModule
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    image_input,
    nested,
    register,
    rules_for,
)
from flax_attention.models.resnet import ResNet, resnet18, resnet34, resnet50
from flax_attention.resnet_blocks import ResidualBlock, hook_rules
from flax_attention.selective_kernel import SelectiveKernel
from flax_attention.squeeze_excitation import SEModule

__all__ = [
    "SelectiveKernelBasic",
    "SkresnetBasic",
    "cbam_resnet50",
    "ecaresnet26t",
    "ecaresnet50d",
    "ecaresnet50t",
    "resnet50d",
    "seresnet18",
    "seresnet34",
    "seresnet50",
    "seresnet50t",
    "skresnet18",
    "skresnet34",
]


class SelectiveKernelBasic(ResidualBlock):
    """timm's `SelectiveKernelBasic` (sknet.py), the block of skresnet18/34 (expansion 1).

    `conv1` = `SelectiveKernel(planes, stride, first_dilation)` (its paths conv-BN-ReLU, the
    input split across them), `conv2` = 3x3 conv (`dilation`) + BN without activation (timm's
    `ConvNormAct(apply_act=False)`, keys `conv2.conv`, `conv2.bn`), the optional attention `se`,
    plus the shortcut, ReLU.

    Differences from timm: the projection is decided as in `BasicBlock`; `aa_layer` and
    `drop_block` are not supported.

    Attributes:
      rd_ratio, rd_divisor: of the selective kernel's attention (timm's `SelectiveKernel`
        defaults, 1/16 and 8; skresnet18/34 use `SkresnetBasic`'s 1/8 and 16).
      split_input: split the input channels across the kernel's paths (timm's True).
      the others: `BasicBlock`'s (groups and base_width must be 1 and 64).
    """

    rd_ratio: float = 1.0 / 16
    rd_divisor: int = 8
    split_input: bool = True

    @nn.nowrap
    def selective_kernel(self) -> SelectiveKernel:
        return SelectiveKernel(out_channels=self.planes, stride=self.stride,
                               dilation=self.entry_dilation, rd_ratio=self.rd_ratio,
                               rd_divisor=self.rd_divisor, split_input=self.split_input,
                               name="conv1",
                               **layers.numerics(self))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H / stride, W / stride, planes]` (sizes rounded up)."""
        downsample = self._check(x)
        if self.groups != 1 or self.base_width != 64:
            raise ValueError(f"SelectiveKernelBasic needs groups=1 and base_width=64, got "
                             f"{self.groups}, {self.base_width}")
        out = self.selective_kernel()(x, train)
        out = layers.ConvBN(self.planes, 3, dilation=self.dilation, activation=None,
                            name="conv2", **layers.numerics(self))(out, train)
        return self._attend_and_add(x, out, downsample, train)


class SkresnetBasic(SelectiveKernelBasic):
    """The block of skresnet18/34: `SelectiveKernelBasic` with their `sk_kwargs`
    (`rd_ratio=1/8, rd_divisor=16, split_input=True`, timm's sknet.py)."""

    rd_ratio: float = 1.0 / 8
    rd_divisor: int = 16


# timm's ResNet starts every block's last BN scale at zero (`zero_init_last`); its sknet.py
# ResNets do not.
_Z = dict(zero_init_last=True)
_D = dict(stem_type="deep", stem_width=32, avg_down=True, **_Z)
_T = dict(stem_type="deep_tiered", stem_width=32, avg_down=True, **_Z)

resnet50d = functools.partial(resnet50, **_D)
seresnet18 = functools.partial(resnet18, attention=SEModule, **_Z)
seresnet34 = functools.partial(resnet34, attention=SEModule, **_Z)
seresnet50 = functools.partial(resnet50, attention=SEModule, **_Z)
seresnet50t = functools.partial(resnet50, attention=SEModule, **_T)
ecaresnet26t = functools.partial(resnet50, stage_sizes=(2, 2, 2, 2), attention=EcaModule, **_T)
ecaresnet50d = functools.partial(resnet50, attention=EcaModule, **_D)
ecaresnet50t = functools.partial(resnet50, attention=EcaModule, **_T)
# Not a timm model name: timm's ResNet-50 with `block_args=dict(attn_layer="cbam")`.
cbam_resnet50 = functools.partial(resnet50, attention=CbamModule, **_Z)
skresnet18 = functools.partial(ResNet, block_cls=SkresnetBasic, stage_sizes=(2, 2, 2, 2))
skresnet34 = functools.partial(ResNet, block_cls=SkresnetBasic, stage_sizes=(3, 4, 6, 3))


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# timm's keys: `conv1.paths.N.{conv,bn}`, `conv1.attn.{fc_reduce,bn,fc_select}`,
# `conv2.{conv,bn}`, then `se.*` and `downsample.*` as in the other blocks.

def _sk_basic_rules(module: SelectiveKernelBasic) -> Rules:
    rules = nested(rules_for(module.selective_kernel()), ("conv1",), "conv1")
    rules |= conv(("conv2", "conv"), "conv2.conv", bias=False)
    return rules | batch_norm(("conv2", "bn"), "conv2.bn") | hook_rules(module)


def _sk_basic_inputs(module: SelectiveKernelBasic, shapes: Shapes
                     ) -> tuple[jax.ShapeDtypeStruct]:
    (x,) = image_input(shapes, "conv1.paths.0.conv.weight", side=8)
    paths = 2 if module.split_input else 1
    return (jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-1] * paths), x.dtype),)


register(SelectiveKernelBasic)(Converter(_sk_basic_rules, _sk_basic_inputs))
