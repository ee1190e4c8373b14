"""PyTorch references for the whole segmentation networks of speedinghzl/CCNet
(networks/ccnet.py: `ResNet`, `Bottleneck`, `Seg_Model`) and junfu1115/DANet (the `encoding`
package: encoding/models/backbone/resnet.py `ResNet` with `deep_stem=True, stem_width=64`,
encoding/models/sseg/danet.py `DANet`), NCHW, with the repositories' parameter names and
structure. CCNet's InPlaceABNSync is `InPlaceABN` (BatchNorm scaled by `|weight| + eps`, then
leaky ReLU 0.01), its `BatchNorm2d` (InPlaceABNSync with activation "identity") an `InPlaceABN`
without activation; the heads are
those of tests/reference/criss_cross.py and tests/reference/danet.py. Both networks return the
outputs before upsampling: CCNet `[x, x_dsn]`, DANet `(fused, pam, cam)` at the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.criss_cross import InPlaceABN, RCCAModule, to_inplace_abn
from tests.reference.danet import DANetHead


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """CCNet's and encoding's bottleneck (v1.5: the stride on conv2)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + residual)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, first_dilation: int,
                dilation: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
    layers = [Bottleneck(inplanes, planes, stride, first_dilation, downsample)]
    layers += [Bottleneck(planes * 4, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class CCNet(nn.Module):
    """speedinghzl/CCNet's `ResNet` (the segmenter): deep stem conv1/bn1..conv3/bn3, ceil-mode
    max-pool, layer3 all at dilation 2 and layer4 all at 4 (`multi_grid=(1, 1, 1)`), `head`
    (RCCAModule(2048, 512, num_classes)), `dsn` on layer3. `Seg_Model` is layers (3, 4, 23, 3)."""

    def __init__(self, layers: tuple[int, ...], num_classes: int, recurrence: int):
        super().__init__()
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.layer1 = _make_layer(128, 64, layers[0], 1, 1, 1)
        self.layer2 = _make_layer(256, 128, layers[1], 2, 1, 1)
        self.layer3 = _make_layer(512, 256, layers[2], 1, 2, 2)
        self.layer4 = _make_layer(1024, 512, layers[3], 1, 4, 4)
        self.head = RCCAModule(2048, 512, num_classes, recurrence)
        self.dsn = nn.Sequential(nn.Conv2d(1024, 512, 3, 1, 1), InPlaceABN(512),
                                 nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1))
        to_inplace_abn(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = self.layer3(self.layer2(self.layer1(self.maxpool(x))))
        return [self.head(self.layer4(x)), self.dsn(x)]


class EncodingResNet(nn.Module):
    """The `encoding` package's ResNet as DANet builds it (`deep_stem=True`, `stem_width=64`,
    `dilated=True`, `fc` set to None): the first block of layer3 at dilation 1, of layer4 at 2."""

    def __init__(self, layers: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Sequential(
            _conv3x3(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(),
            _conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(),
            _conv3x3(64, 128),
        )
        self.bn1 = nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _make_layer(128, 64, layers[0], 1, 1, 1)
        self.layer2 = _make_layer(256, 128, layers[1], 2, 1, 1)
        self.layer3 = _make_layer(512, 256, layers[2], 1, 1, 2)
        self.layer4 = _make_layer(1024, 512, layers[3], 1, 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DANet(nn.Module):
    """junfu1115/DANet's `DANet`: `pretrained` (EncodingResNet) and `head` (DANetHead(2048,
    nclass)), the three outputs upsampled bilinearly with aligned corners."""

    def __init__(self, layers: tuple[int, ...], nclass: int):
        super().__init__()
        self.pretrained = EncodingResNet(layers)
        self.head = DANetHead(2048, nclass)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.head(self.pretrained(x))
        return tuple(F.interpolate(o, x.shape[2:], mode="bilinear", align_corners=True)
                     for o in outputs)
