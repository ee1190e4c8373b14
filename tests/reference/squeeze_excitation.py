"""PyTorch references for squeeze-and-excitation (NCHW), written from the SE paper and the facts
of moskomule/senet.pytorch: `fc.0`/`fc.2` bias-free Linears, SE after the last BatchNorm and
before the residual add, torchvision's ResNet names and shortcut projection."""

from __future__ import annotations

import torch
from torch import nn


class SELayer(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, *S]` -> `[B, C]`."""
        return self.fc(x.flatten(2).mean(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)
        return x * g.view(*g.shape, *(1,) * (x.dim() - 2))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class _Block(nn.Module):
    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = self.se(out)
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


class SEBasicBlock(_Block):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, reduction: int = 16):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SELayer(planes, reduction)
        self.downsample = _shortcut(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.finish(x, self.bn2(self.conv2(out)))


class SEBottleneck(_Block):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, reduction: int = 16,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        self.conv1 = _conv(inplanes, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.se = SELayer(planes * 4, reduction)
        self.downsample = _shortcut(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return self.finish(x, self.bn3(self.conv3(out)))
