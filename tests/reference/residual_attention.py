"""PyTorch reference for the Residual Attention Network (NCHW), written from the paper.

Structure as in Wang et al. (CVPR 2017) and its common PyTorch port: pre-activation bottleneck
units, trunk (t units) and an hourglass soft mask (max-pool down, bilinear align_corners up,
skip units), output (1 + M) * T between p units. Submodules are named as the Flax modules
(`first_0`, `down_1_0`, `skip_0`, `middle_1`, `up_0_0`, `mask_conv2`, `attention_module2_1`,
...), so state dicts feed `from_torch` unchanged. The upsampling sizes come from the skip
tensors, not from a fixed input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualUnit(nn.Module):
    """BN-ReLU-1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1, bottleneck 4; projection `conv4` if needed."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        mid = out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.conv4 = None
        if in_channels != out_channels or stride != 1:
            self.conv4 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.conv4 is None else self.conv4(pre))


class AttentionModule(nn.Module):
    """Attention module with `levels` down-up levels (stage 1/2/3: 3/2/1)."""

    def __init__(self, channels: int, levels: int, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        self.levels, self.p, self.t, self.r = levels, p, t, r
        names = [f"first_{i}" for i in range(p)] + [f"trunk_{i}" for i in range(t)]
        for level in range(levels - 1):
            names += [f"down_{level}_{i}" for i in range(r)] + [f"skip_{level}"]
            names += [f"up_{level}_{i}" for i in range(r)]
        names += [f"middle_{i}" for i in range(2 * r)] + [f"last_{i}" for i in range(p)]
        for name in names:
            self.add_module(name, ResidualUnit(channels, channels))
        self.mask_bn1 = nn.BatchNorm2d(channels)
        self.mask_conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.mask_bn2 = nn.BatchNorm2d(channels)
        self.mask_conv2 = nn.Conv2d(channels, channels, 1, bias=False)

    def _run(self, x: torch.Tensor, prefix: str, count: int) -> torch.Tensor:
        for i in range(count):
            x = getattr(self, f"{prefix}_{i}")(x)
        return x

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        m, skips = x, []
        for level in range(self.levels - 1):
            m = self._run(F.max_pool2d(m, 3, 2, 1), f"down_{level}", self.r)
            skips.append(getattr(self, f"skip_{level}")(m))
        if self.levels:
            m = F.max_pool2d(m, 3, 2, 1)
        m = self._run(m, "middle", 2 * self.r)
        for level in reversed(range(self.levels - 1)):
            up = F.interpolate(m, size=skips[level].shape[2:], mode="bilinear", align_corners=True)
            m = self._run(up + skips[level], f"up_{level}", self.r)
        if self.levels:
            m = F.interpolate(m, size=x.shape[2:], mode="bilinear", align_corners=True)
        m = self.mask_conv1(F.relu(self.mask_bn1(m)))
        return torch.sigmoid(self.mask_conv2(F.relu(self.mask_bn2(m))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run(x, "first", self.p)
        trunk = self._run(x, "trunk", self.t)
        return self._run((1 + self.mask(x)) * trunk, "last", self.p)


class Stem(nn.Module):
    def __init__(self, in_channels: int, width: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResidualAttentionNetwork(nn.Module):
    """Attention-56 (stage_sizes 1, 1, 1) / -92 (1, 2, 3); ImageNet or the CIFAR variant."""

    def __init__(self, stage_sizes=(1, 1, 1), num_classes: int = 1000, cifar: bool = False,
                 width: int = 64):
        super().__init__()
        self.cifar, self.stage_sizes = cifar, stage_sizes
        self.conv1 = Stem(3, width, 3 if cifar else 7, 1 if cifar else 2)
        strides = (1, 2, 2, 1 if cifar else 2)
        channels = width
        for stage, count in enumerate(stage_sizes, start=1):
            out = 4 * width * 2 ** (stage - 1)
            unit = ResidualUnit(channels, out, strides[stage - 1])
            self.add_module(f"residual_block{stage}", unit)
            for j in range(count):
                levels = 3 - stage if cifar else 4 - stage
                self.add_module(f"attention_module{stage}_{j}", AttentionModule(out, levels))
            channels = out
        self.residual_block4 = ResidualUnit(channels, 32 * width, strides[3])
        self.residual_block5 = ResidualUnit(32 * width, 32 * width)
        self.residual_block6 = ResidualUnit(32 * width, 32 * width)
        self.final_bn = nn.BatchNorm2d(32 * width)
        self.fc = nn.Linear(32 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.cifar:
            x = F.max_pool2d(x, 3, 2, 1)
        for stage, count in enumerate(self.stage_sizes, start=1):
            x = getattr(self, f"residual_block{stage}")(x)
            for j in range(count):
                x = getattr(self, f"attention_module{stage}_{j}")(x)
        x = self.residual_block6(self.residual_block5(self.residual_block4(x)))
        x = F.relu(self.final_bn(x)).mean(dim=(2, 3))
        return self.fc(x)
