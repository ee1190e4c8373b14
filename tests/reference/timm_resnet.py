"""PyTorch references for timm's attention ResNets (NCHW), written from timm 1.0.31
`timm/models/resnet.py` (`BasicBlock`, `Bottleneck`, `downsample_conv`, `downsample_avg`,
`make_blocks`, `ResNet` with its stems), `timm/models/sknet.py` (`SelectiveKernelBasic`) and
`timm/layers/squeeze_excite.py` (`SEModule`), with timm's module names, so the state dict keys
are timm's. Reduced to what the models use: output stride 32, no anti-aliasing, drop block, drop
path, `block_reduce_first` or `down_kernel_size`; the attention layers are the references of
`tests/reference/{eca,cbam,global_context,selective_kernel}.py`. The model functions at the end
use timm's exact configurations (`seresnet50`, `ecaresnet50d`, ...)."""

from __future__ import annotations

import functools

from torch import nn

from tests.reference.cbam import CbamModule
from tests.reference.eca import EcaModule, make_divisible
from tests.reference.global_context import GlobalContext
from tests.reference.selective_kernel import ConvNormAct, SelectiveKernel


class SEModule(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8,
                 add_maxpool=False, bias=True, act_layer=nn.ReLU, gate_layer=nn.Sigmoid):
        super().__init__()
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn = nn.Identity()
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = gate_layer()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.act(self.bn(self.fc1(x_se)))
        return x * self.gate(self.fc2(x_se))


_ATTN = {
    "se": SEModule,
    "eca": EcaModule,
    "cbam": CbamModule,
    "gca": functools.partial(GlobalContext, fuse_add=True, fuse_scale=False),
}


def create_attn(attn_layer, channels):
    return None if attn_layer is None else _ATTN[attn_layer](channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = create_attn(attn_layer, planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None):
        super().__init__()
        width = planes  # cardinality 1, base width 64
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = create_attn(attn_layer, outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


class SelectiveKernelBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None,
                 sk_kwargs=None, dilation=1, first_dilation=None):
        super().__init__()
        self.conv1 = SelectiveKernel(inplanes, planes, stride=stride,
                                     dilation=first_dilation or dilation, **(sk_kwargs or {}))
        self.conv2 = ConvNormAct(planes, planes, kernel_size=3, dilation=dilation,
                                 act_layer=nn.Identity)
        self.se = create_attn(attn_layer, planes)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.conv2(self.conv1(x))
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act(x + shortcut)


def downsample_conv(in_channels, out_channels, stride):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


def downsample_avg(in_channels, out_channels, stride):
    pool = nn.Identity() if stride == 1 else nn.AvgPool2d(
        2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, stem_width=64, stem_type="",
                 avg_down=False, block_args=None):
        super().__init__()
        deep_stem = "deep" in stem_type
        inplanes = stem_width * 2 if deep_stem else 64
        if deep_stem:
            stem_chs = (stem_width, stem_width)
            if "tiered" in stem_type:
                stem_chs = (3 * (stem_width // 4), stem_width)
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_chs[0], 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(stem_chs[0]), nn.ReLU(inplace=True),
                nn.Conv2d(stem_chs[0], stem_chs[1], 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(stem_chs[1]), nn.ReLU(inplace=True),
                nn.Conv2d(stem_chs[1], inplanes, 3, stride=1, padding=1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for k, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if k == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                make = downsample_avg if avg_down else downsample_conv
                downsample = make(inplanes, planes * block.expansion, stride)
            blocks = []
            for n in range(num_blocks):
                blocks.append(block(inplanes, planes, stride if n == 0 else 1,
                                    downsample if n == 0 else None, **(block_args or {})))
                inplanes = planes * block.expansion
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.global_pool(x).flatten(1))


# --- timm's model configurations ----------------------------------------------------------------

_D = dict(stem_width=32, stem_type="deep", avg_down=True)
_T = dict(stem_width=32, stem_type="deep_tiered", avg_down=True)
_SK = dict(sk_kwargs=dict(rd_ratio=1 / 8, rd_divisor=16, split_input=True))
_R50 = (3, 4, 6, 3)

# name: (block, layers, ResNet kwargs), as timm's model functions pass them; `cbam_resnet50` is
# not a timm name (timm's ResNet-50 with `block_args=dict(attn_layer="cbam")`).
CONFIGS = {
    "seresnet18": (BasicBlock, (2, 2, 2, 2), dict(block_args=dict(attn_layer="se"))),
    "seresnet34": (BasicBlock, _R50, dict(block_args=dict(attn_layer="se"))),
    "seresnet50": (Bottleneck, _R50, dict(block_args=dict(attn_layer="se"))),
    "seresnet50t": (Bottleneck, _R50, dict(block_args=dict(attn_layer="se"), **_T)),
    "resnet50d": (Bottleneck, _R50, _D),
    "ecaresnet50d": (Bottleneck, _R50, dict(block_args=dict(attn_layer="eca"), **_D)),
    "ecaresnet50t": (Bottleneck, _R50, dict(block_args=dict(attn_layer="eca"), **_T)),
    "ecaresnet26t": (Bottleneck, (2, 2, 2, 2), dict(block_args=dict(attn_layer="eca"), **_T)),
    "cbam_resnet50": (Bottleneck, _R50, dict(block_args=dict(attn_layer="cbam"))),
    "skresnet18": (SelectiveKernelBasic, (2, 2, 2, 2), dict(block_args=_SK)),
    "skresnet34": (SelectiveKernelBasic, _R50, dict(block_args=_SK)),
}


def create(name: str, layers=None, **kwargs) -> nn.Module:
    """timm's model `name`, with other `layers` (blocks per stage) if given."""
    if name == "gcresnet50t":
        return gcresnet50t(layers, **kwargs)
    block, default_layers, config = CONFIGS[name]
    return ResNet(block, layers or default_layers, **config, **kwargs)


# --- timm/models/byobnet.py, as gcresnet50t uses it ----------------------------------------------


class BottleneckBlock(nn.Module):
    """byobnet's `BottleneckBlock`: 1x1 - 3x3 - attn (on the mid channels) - 1x1, shortcut
    `conv1x1` (`ConvNormAct` without activation) or identity."""

    def __init__(self, in_chs, out_chs, stride=1, bottle_ratio=0.25, attn_layer=None):
        super().__init__()
        mid_chs = make_divisible(out_chs * bottle_ratio)
        self.shortcut = nn.Identity()
        if in_chs != out_chs or stride != 1:
            self.shortcut = ConvNormAct(in_chs, out_chs, 1, stride=stride, act_layer=nn.Identity)
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, 3, stride=stride)
        self.conv2b_kxk = nn.Identity()
        self.attn = nn.Identity() if attn_layer is None else _ATTN[attn_layer](mid_chs)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, act_layer=nn.Identity)
        self.attn_last = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.conv3_1x1(self.attn(self.conv2b_kxk(self.conv2_kxk(self.conv1_1x1(x)))))
        return self.act(x + self.shortcut(shortcut))


class ClassifierHead(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(self.global_pool(x).flatten(1))


class ByobNet(nn.Module):
    """byobnet's `ByobNet` with the "tiered" `Stem` of 64 channels and no stem pool (strides 2,
    1, 2: the last conv is strided when there is no pool), bottleneck stages (`br=0.25`), the
    model-wide `attn_layer`, no final conv, `head.fc`."""

    def __init__(self, depths, channels=(256, 512, 1024, 2048), strides=(1, 2, 2, 2),
                 stem_chs=64, attn_layer=None, num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential()
        tiers = (3 * stem_chs // 8, stem_chs // 2, stem_chs)
        for i, (ch, s) in enumerate(zip(tiers, (2, 1, 2), strict=True)):
            self.stem.add_module(f"conv{i + 1}", ConvNormAct(tiers[i - 1] if i else 3, ch, 3, s))
        prev_chs, stages = stem_chs, []
        for depth, out_chs, stride in zip(depths, channels, strides, strict=True):
            blocks = []
            for j in range(depth):
                blocks.append(BottleneckBlock(prev_chs, out_chs, stride if j == 0 else 1,
                                              attn_layer=attn_layer))
                prev_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = nn.Identity()
        self.head = ClassifierHead(prev_chs, num_classes)

    def forward(self, x):
        return self.head(self.final_conv(self.stages(self.stem(x))))


def gcresnet50t(depths=None, **kwargs) -> ByobNet:
    return ByobNet(depths or (3, 4, 6, 3), attn_layer="gca", **kwargs)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

