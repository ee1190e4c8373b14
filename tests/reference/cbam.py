"""PyTorch reference for CBAM and light CBAM (NCHW), after timm 1.0.31 `timm/layers/cbam.py`
and the `ConvNormAct` (`timm/layers/conv_bn_act.py`) it uses: a bias-free conv with padding
`(k - 1) // 2`, then BatchNorm (eps 1e-5), no activation. Class names, constructor arguments,
defaults and parameter names are timm's; `device`/`dtype` are left out, and `gate_layer` /
`act_layer` are module classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.global_context import make_divisible


class ConvNormAct(nn.Module):
    """timm's `ConvNormAct(in, out, k, apply_act=False)`: keys `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class ChannelAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1,
                 act_layer=nn.ReLU, gate_layer=nn.Sigmoid, mlp_bias=False):
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)
        self.gate = gate_layer()

    def gates(self, x):
        """`[B, C]` (not part of timm)."""
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return self.gate(x_avg + x_max).flatten(1)

    def forward(self, x):
        return x * self.gates(x)[:, :, None, None]


class LightChannelAttn(ChannelAttn):
    def gates(self, x):
        x_pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return F.sigmoid(self.fc2(self.act(self.fc1(x_pool)))).flatten(1)


class SpatialAttn(nn.Module):
    def __init__(self, kernel_size=7, gate_layer=nn.Sigmoid):
        super().__init__()
        self.conv = ConvNormAct(2, 1, kernel_size)
        self.gate = gate_layer()

    def pool(self, x):
        return torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)

    def gates(self, x):
        """`[B, H, W]` (not part of timm)."""
        return self.gate(self.conv(self.pool(x)))[:, 0]

    def forward(self, x):
        return x * self.gates(x)[:, None]


class LightSpatialAttn(SpatialAttn):
    def __init__(self, kernel_size=7, gate_layer=nn.Sigmoid):
        super().__init__(kernel_size, gate_layer)
        self.conv = ConvNormAct(1, 1, kernel_size)

    def pool(self, x):
        return 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)


class CbamModule(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1,
                 spatial_kernel_size=7, act_layer=nn.ReLU, gate_layer=nn.Sigmoid,
                 mlp_bias=False):
        super().__init__()
        self.channel = ChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                   rd_divisor=rd_divisor, act_layer=act_layer,
                                   gate_layer=gate_layer, mlp_bias=mlp_bias)
        self.spatial = SpatialAttn(spatial_kernel_size, gate_layer=gate_layer)

    def forward(self, x):
        return self.spatial(self.channel(x))


class LightCbamModule(nn.Module):
    """As timm: `gate_layer` reaches neither gate (both are sigmoids)."""

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1,
                 spatial_kernel_size=7, act_layer=nn.ReLU, gate_layer=nn.Sigmoid,
                 mlp_bias=False):
        super().__init__()
        self.channel = LightChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                        rd_divisor=rd_divisor, act_layer=act_layer,
                                        gate_layer=gate_layer, mlp_bias=mlp_bias)
        self.spatial = LightSpatialAttn(spatial_kernel_size)

    def forward(self, x):
        return self.spatial(self.channel(x))
