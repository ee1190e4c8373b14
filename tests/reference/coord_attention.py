"""PyTorch references for coordinate attention (NCHW), two of them:

* `CoordAttn`: timm 1.0.31 `timm/layers/coord_attn.py`, its arguments and names (`conv1`, `bn1`,
  `conv_h`, `conv_w`; no biases by default; hidden width from `make_divisible` with
  round_limit 0; Hardswish; gate 'sigmoid' or 'hard_sigmoid'; `has_skip`).
* `CoordAtt`: houqb/CoordAttention `coordatt.py` (biases, `mip = max(8, inp // reduction)`,
  h_swish = x * relu6(x + 3) / 6, sigmoid gates).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.reference.selective_kernel import make_divisible


class CoordAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1. / 16, rd_channels=None, rd_divisor=8,
                 se_factor=2 / 3, bias=False, act_layer=nn.Hardswish,
                 norm_layer=nn.BatchNorm2d, gate_layer="sigmoid", has_skip=False):
        super().__init__()
        self.has_skip = has_skip
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio * se_factor, rd_divisor,
                                         round_limit=0.)
        self.conv1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias)
        self.bn1 = norm_layer(rd_channels)
        self.act = act_layer()
        self.conv_h = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.conv_w = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias)
        self.gate = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid,
                     "hardsigmoid": nn.Hardsigmoid}[gate_layer]()

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_h `[B, C, H, 1]` and a_w `[B, C, 1, W]`."""
        H, W = x.shape[2:]
        x_h = x.mean(3, keepdim=True)
        x_w = x.mean(2, keepdim=True).transpose(-1, -2)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        x_h, x_w = torch.split(y, [H, W], dim=2)
        return self.gate(self.conv_h(x_h)), self.gate(self.conv_w(x_w.transpose(-1, -2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        out = x * a_w * a_h
        return out + x if self.has_skip else out


class h_sigmoid(nn.Module):  # noqa: N801 (the reference's name)
    def __init__(self, inplace=True):
        super().__init__()
        self.relu = nn.ReLU6(inplace=inplace)

    def forward(self, x):
        return self.relu(x + 3) / 6


class h_swish(nn.Module):  # noqa: N801
    def __init__(self, inplace=True):
        super().__init__()
        self.sigmoid = h_sigmoid(inplace=inplace)

    def forward(self, x):
        return x * self.sigmoid(x)


class CoordAtt(nn.Module):
    def __init__(self, inp, oup, reduction=32):
        super().__init__()
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, kernel_size=1, stride=1, padding=0)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = h_swish()
        self.conv_h = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)
        self.conv_w = nn.Conv2d(mip, oup, kernel_size=1, stride=1, padding=0)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_h `[B, C, H, 1]` and a_w `[B, C, 1, W]`."""
        h, w = x.shape[2:]
        x_h = self.pool_h(x)
        x_w = self.pool_w(x).permute(0, 1, 3, 2)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        x_h, x_w = torch.split(y, [h, w], dim=2)
        return self.conv_h(x_h).sigmoid(), self.conv_w(x_w.permute(0, 1, 3, 2)).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return x * a_w * a_h
