"""PyTorch reference for gather-excite (NCHW), written from timm 1.0.31's
`timm/layers/gather_excite.py` (`GatherExcite`) with the one-line fix it needs to be built (its
`dd` kwargs dict is passed positionally, `*dd`, into `create_conv2d`, `BatchNorm2d` and
`ConvMlp`; here there is no `dd`). timm's helpers are inlined: `create_conv2d`'s depthwise conv
without bias and padding `((stride - 1) + (k - 1)) // 2`, `ConvMlp` (`fc1`, `norm` = Identity,
`act`, `drop`, `fc2`), `make_divisible`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.eca import create_act_layer, make_divisible


def _padding(kernel_size, stride: int):
    if isinstance(kernel_size, (tuple, list)):
        return [_padding(k, stride) for k in kernel_size]
    return ((stride - 1) + (kernel_size - 1)) // 2


def create_conv2d(in_chs, out_chs, kernel_size, stride=1, depthwise=False):
    groups = in_chs if depthwise else 1
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride,
                     padding=_padding(kernel_size, stride), groups=groups, bias=False)


class ConvMlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.ReLU):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=True)
        self.norm = nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1, bias=True)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


class GatherExcite(nn.Module):
    def __init__(self, channels, feat_size=None, extra_params=False, extent=0, use_mlp=True,
                 rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, add_maxpool=False,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, gate_layer="sigmoid"):
        super().__init__()
        self.add_maxpool = add_maxpool
        self.extent = extent
        if extra_params:
            self.gather = nn.Sequential()
            if extent == 0:
                assert feat_size is not None
                self.gather.add_module("conv1", create_conv2d(
                    channels, channels, kernel_size=feat_size, stride=1, depthwise=True))
                if norm_layer:
                    self.gather.add_module("norm1", nn.BatchNorm2d(channels))
            else:
                assert extent % 2 == 0
                num_conv = int(math.log2(extent))
                for i in range(num_conv):
                    self.gather.add_module(f"conv{i + 1}", create_conv2d(
                        channels, channels, kernel_size=3, stride=2, depthwise=True))
                    if norm_layer:
                        self.gather.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels))
                    if i != num_conv - 1:
                        self.gather.add_module(f"act{i + 1}", act_layer(inplace=True))
        else:
            self.gather = None
            if self.extent == 0:
                self.gk = 0
                self.gs = 0
            else:
                assert extent % 2 == 0
                self.gk = self.extent * 2 - 1
                self.gs = self.extent
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.mlp = ConvMlp(channels, rd_channels, act_layer=act_layer) if use_mlp else (
            nn.Identity())
        self.gate = create_act_layer(gate_layer)

    def gather_(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward up to the MLP."""
        if self.gather is not None:
            return self.gather(x)
        if self.extent == 0:
            x_ge = x.mean(dim=(2, 3), keepdims=True)
            if self.add_maxpool:
                x_ge = 0.5 * x_ge + 0.5 * x.amax((2, 3), keepdim=True)
            return x_ge
        x_ge = F.avg_pool2d(x, kernel_size=self.gk, stride=self.gs, padding=self.gk // 2,
                            count_include_pad=False)
        if self.add_maxpool:
            x_ge = 0.5 * x_ge + 0.5 * F.max_pool2d(x, kernel_size=self.gk, stride=self.gs,
                                                   padding=self.gk // 2)
        return x_ge

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The gates before the interpolation, `[B, C, h, w]`."""
        return self.gate(self.mlp(self.gather_(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x_ge = self.mlp(self.gather_(x))
        if x_ge.shape[-1] != 1 or x_ge.shape[-2] != 1:
            x_ge = F.interpolate(x_ge, size=size)
        return x * self.gate(x_ge)
