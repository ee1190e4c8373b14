"""PyTorch reference for tengshaofeng/ResidualAttentionNetwork-pytorch's networks, NCHW, with
the port's parameter names and structure (model/basic_layers.py `ResidualBlock`,
model/attention_module.py `AttentionModule_stage1/2/3` and `_stage1/2/3_cifar`,
model/residual_attention_network.py `ResidualAttentionModel_56`, `_92`,
`_92_32input_update`): every `ResidualBlock` holds `conv4`, used only when the shape changes;
the mask adds the map each level max-pooled (and at the top the trunk) to the upsampled maps;
`UpsamplingBilinear2d` (aligned corners) to the fixed sizes of the port's input size, here the
sizes of the maps added. `stage_sizes` other than the port's give smaller test networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, input_channels: int, output_channels: int, stride: int = 1):
        super().__init__()
        self.project = input_channels != output_channels or stride != 1
        mid = output_channels // 4
        self.bn1 = nn.BatchNorm2d(input_channels)
        self.conv1 = nn.Conv2d(input_channels, mid, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, output_channels, 1, 1, bias=False)
        self.conv4 = nn.Conv2d(input_channels, output_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out1))))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (self.conv4(out1) if self.project else x)


def _mask_head(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False),
                         nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False),
                         nn.Sigmoid())


class AttentionModule(nn.Module):
    """`AttentionModule_stage{4 - levels}` (ImageNet names `softmax<n>_blocks`) or
    `_stage{3 - levels}_cifar` (`down_residual_blocks1`, `middle_2r_blocks`, ...)."""

    def __init__(self, c: int, levels: int, cifar: bool):
        super().__init__()
        self.levels = levels
        self.first_residual_blocks = ResidualBlock(c, c)
        self.trunk_branches = nn.Sequential(ResidualBlock(c, c), ResidualBlock(c, c))
        self.down, self.skip, self.up = [], [], []
        for n in range(levels - 1):
            down = f"down_residual_blocks{n + 1}" if cifar else f"softmax{n + 1}_blocks"
            up = f"up_residual_blocks{n + 1}" if cifar else f"softmax{2 * levels - 1 - n}_blocks"
            skip = f"skip{n + 1}_connection_residual_block"
            for name, names in ((down, self.down), (skip, self.skip), (up, self.up)):
                setattr(self, name, ResidualBlock(c, c))
                names.append(name)
        self.middle = "middle_2r_blocks" if cifar else f"softmax{levels}_blocks"
        setattr(self, self.middle, nn.Sequential(ResidualBlock(c, c), ResidualBlock(c, c)))
        self.head = "conv1_1_blocks" if cifar else f"softmax{2 * levels}_blocks"
        setattr(self, self.head, _mask_head(c))
        self.last_blocks = ResidualBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_residual_blocks(x)
        out_trunk = self.trunk_branches(x)
        m, downs, skips = x, [], []
        for n in range(self.levels - 1):
            m = getattr(self, self.down[n])(F.max_pool2d(m, 3, 2, 1))
            downs.append(m)
            skips.append(getattr(self, self.skip[n])(m))
        m = getattr(self, self.middle)(F.max_pool2d(m, 3, 2, 1) if self.levels else m)
        for n in reversed(range(self.levels - 1)):
            m = F.interpolate(m, downs[n].shape[2:], mode="bilinear", align_corners=True)
            m = getattr(self, self.up[n])(m + downs[n] + skips[n])
        if self.levels:
            m = F.interpolate(m, x.shape[2:], mode="bilinear", align_corners=True) + out_trunk
        mask = getattr(self, self.head)(m)
        return self.last_blocks((1 + mask) * out_trunk)


class ResidualAttentionModel(nn.Module):
    """`ResidualAttentionModel_56` (stage_sizes (1, 1, 1)) / `_92` ((1, 2, 3)), or with `cifar`
    `_92_32input_update` ((1, 2, 3)); 10 classes."""

    def __init__(self, stage_sizes: tuple[int, int, int], cifar: bool):
        super().__init__()
        w = 32 if cifar else 64
        stem = nn.Conv2d(3, w, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, w, 7, 2, 3,
                                                                            bias=False)
        self.conv1 = nn.Sequential(stem, nn.BatchNorm2d(w), nn.ReLU())
        self.cifar = cifar
        self.stages = []
        for stage, count in enumerate(stage_sizes, start=1):
            c_in = w if stage == 1 else 2 * w * 2 ** (stage - 1)
            setattr(self, f"residual_block{stage}",
                    ResidualBlock(c_in, 4 * w * 2 ** (stage - 1), 1 if stage == 1 else 2))
            names = [f"attention_module{stage}" + (f"_{j + 1}" if j else "") for j in range(count)]
            for name in names:
                levels = (3 if cifar else 4) - stage
                setattr(self, name, AttentionModule(4 * w * 2 ** (stage - 1), levels, cifar))
            self.stages.append([f"residual_block{stage}", *names])
        self.residual_block4 = ResidualBlock(16 * w, 32 * w, 1 if cifar else 2)
        self.residual_block5 = ResidualBlock(32 * w, 32 * w)
        self.residual_block6 = ResidualBlock(32 * w, 32 * w)
        self.mpool2 = nn.Sequential(nn.BatchNorm2d(32 * w), nn.ReLU())
        self.fc = nn.Linear(32 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.cifar:
            out = F.max_pool2d(out, 3, 2, 1)
        for names in self.stages:
            for name in names:
                out = getattr(self, name)(out)
        out = self.residual_block6(self.residual_block5(self.residual_block4(out)))
        out = self.mpool2(out)
        return self.fc(F.avg_pool2d(out, out.shape[2:]).flatten(1))
