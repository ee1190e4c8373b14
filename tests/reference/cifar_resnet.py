"""PyTorch reference for moskomule/senet.pytorch's CIFAR SE-ResNets (senet/se_resnet.py:
`CifarSEResNet`, `CifarSEBasicBlock`, `se_resnet20/32/56`), NCHW, with its parameter names:
`conv1`, `bn1`, `layer<k>.<n>.{conv1,bn1,conv2,bn2,se.fc.0,se.fc.2,downsample.0,downsample.1}`,
`fc`. The block is tests/reference/squeeze_excitation.py's `SEBasicBlock`, which has
`CifarSEBasicBlock`'s names and, in these networks, its shortcut (projected exactly where the
channels change, which is where the stride is 2)."""

from __future__ import annotations

import torch
from torch import nn

from tests.reference.squeeze_excitation import SEBasicBlock


class CifarSEResNet(nn.Module):
    def __init__(self, n_size: int, num_classes: int = 10, reduction: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        inplane = 16
        for k, planes in enumerate((16, 32, 64)):
            blocks = []
            for stride in [1 if k == 0 else 2] + [1] * (n_size - 1):
                blocks.append(SEBasicBlock(inplane, planes, stride, reduction))
                inplane = planes
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))
