"""PyTorch reference for Selective Kernel (NCHW), written from timm 1.0.31
`timm/layers/selective_kernel.py` with timm's class names, arguments and parameter names
(`paths.N.conv`, `paths.N.bn`, `attn.fc_reduce`, `attn.bn`, `attn.fc_select`). timm's
`ConvNormAct` and `BatchNormAct2d` are reduced to what the module uses (no anti-aliasing, no
drop layer); `get_padding` and `make_divisible` are timm's."""

from __future__ import annotations

import torch
from torch import nn


def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by the activation (timm's norm-act layer; same state_dict keys)."""

    def __init__(self, num_features: int, act_layer=nn.ReLU):
        super().__init__(num_features)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvNormAct(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, dilation=1, groups=1,
                 act_layer=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=get_padding(kernel_size, stride, dilation),
                              dilation=dilation, groups=groups, bias=False)
        self.bn = BatchNormAct2d(out_channels, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SelectiveKernelAttn(nn.Module):
    def __init__(self, channels, num_paths=2, attn_channels=32, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = norm_layer(attn_channels)
        self.act = act_layer(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1,
                                   bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.num_paths
        x = x.sum(1).mean((2, 3), keepdim=True)
        x = self.fc_reduce(x)
        x = self.bn(x)
        x = self.act(x)
        x = self.fc_select(x)
        B, C, H, W = x.shape
        x = x.view(B, self.num_paths, C // self.num_paths, H, W)
        return torch.softmax(x, dim=1)


class SelectiveKernel(nn.Module):
    def __init__(self, in_channels, out_channels=None, kernel_size=None, stride=1, dilation=1,
                 groups=1, rd_ratio=1. / 16, rd_channels=None, rd_divisor=8, keep_3x3=True,
                 split_input=True, act_layer=nn.ReLU):
        super().__init__()
        out_channels = out_channels or in_channels
        kernel_size = kernel_size or [3, 5]
        if not isinstance(kernel_size, list):
            kernel_size = [kernel_size] * 2
        if keep_3x3:
            dilation = [dilation * (k - 1) // 2 for k in kernel_size]
            kernel_size = [3] * len(kernel_size)
        else:
            dilation = [dilation] * len(kernel_size)
        self.num_paths = len(kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.split_input = split_input
        if self.split_input:
            assert in_channels % self.num_paths == 0
            in_channels = in_channels // self.num_paths
        groups = min(out_channels, groups)
        self.paths = nn.ModuleList([
            ConvNormAct(in_channels, out_channels, kernel_size=k, stride=stride, dilation=d,
                        groups=groups, act_layer=act_layer)
            for k, d in zip(kernel_size, dilation, strict=True)])
        attn_channels = rd_channels or make_divisible(out_channels * rd_ratio, divisor=rd_divisor)
        self.attn = SelectiveKernelAttn(out_channels, self.num_paths, attn_channels)

    def path_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's `[B, P, C]` weights (for the tests)."""
        return self.attn(self._paths(x)).flatten(2)

    def _paths(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            x_split = torch.split(x, self.in_channels // self.num_paths, 1)
            x_paths = [op(x_split[i]) for i, op in enumerate(self.paths)]
        else:
            x_paths = [op(x) for op in self.paths]
        return torch.stack(x_paths, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._paths(x)
        x_attn = self.attn(x)
        x = x * x_attn
        return torch.sum(x, dim=1)
