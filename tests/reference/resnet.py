"""PyTorch reference ResNets (NCHW), written from the ResNet and SE papers and the facts of
torchvision (v1.5 bottleneck, `replace_stride_with_dilation`, the first block of a dilated stage
keeping the previous dilation) and moskomule/senet.pytorch (`se` after the last BatchNorm, before
the residual add). `reduction=None` gives a plain ResNet. BasicBlock accepts dilation as timm's
does (torchvision refuses it): `first_dilation` on its first 3x3 convolution, `dilation` on the
second, the first block of a dilated stage taking the previous dilation as `first_dilation`
(timm `resnet.py`, `make_blocks`)."""

from __future__ import annotations

import torch
from torch import nn

from tests.reference.squeeze_excitation import SELayer, _shortcut


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
          groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding=dilation * (kernel // 2),
                     dilation=dilation, groups=groups, bias=False)


class _Block(nn.Module):
    expansion = 1

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.se is not None:
            out = self.se(out)
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)

    def attach(self, inplanes: int, stride: int, reduction: int | None) -> None:
        out = self.planes * self.expansion
        self.se = SELayer(out, reduction) if reduction else None
        self.downsample = _shortcut(inplanes, out, stride)


class BasicBlock(_Block):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, base_width: int = 64, reduction: int | None = None,
                 first_dilation: int | None = None):
        super().__init__()
        del groups, base_width
        self.planes = planes
        self.conv1 = _conv(inplanes, planes, 3, stride, first_dilation or dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attach(inplanes, stride, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.finish(x, self.bn2(self.conv2(out)))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, base_width: int = 64, reduction: int | None = None,
                 first_dilation: int | None = None):
        super().__init__()
        self.planes = planes
        width = int(planes * base_width / 64) * groups
        self.conv1 = _conv(inplanes, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, first_dilation or dilation, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.attach(inplanes, stride, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return self.finish(x, self.bn3(self.conv3(out)))


class ResNet(nn.Module):
    """torchvision's ResNet layout; `forward_features` returns the last stage's output."""

    def __init__(self, block: type[_Block], layers: list[int], num_classes: int = 1000,
                 groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: tuple[bool, ...] = (False, False, False),
                 reduction: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, dilation = 64, 1
        for k, size in enumerate(layers):
            stride, previous = (1 if k == 0 else 2), dilation
            if k and replace_stride_with_dilation[k - 1]:
                dilation, stride = dilation * stride, 1
            blocks = []
            for n in range(size):
                blocks.append(block(inplanes, 64 * 2**k, stride if n == 0 else 1, dilation,
                                    groups, width_per_group, reduction,
                                    first_dilation=previous if n == 0 else dilation))
                inplanes = 64 * 2**k * block.expansion
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        self.num_layers = len(layers)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for k in range(self.num_layers):
            x = getattr(self, f"layer{k + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


def se_resnet50(num_classes: int = 1000) -> ResNet:
    """moskomule/senet.pytorch's `se_resnet50`: SE (reduction 16) in every bottleneck."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, reduction=16)
