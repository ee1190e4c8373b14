"""PyTorch references for ECA and CECA (NCHW), written from timm 1.0.31's `timm/layers/eca.py`:
class names, constructor arguments, defaults and parameter names are timm's (`conv`, and
`conv2` in the experimental MLP mode); the adaptive kernel size, padding and gate too."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_GATES = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "tanh": nn.Tanh}


def create_act_layer(layer) -> nn.Module:
    """timm's `create_act_layer` for the names these references use, or a module class."""
    return _GATES[layer]() if isinstance(layer, str) else layer()


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _kernel_size(channels, kernel_size, gamma, beta) -> int:
    if channels is not None:
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        kernel_size = max(t if t % 2 else t + 1, 3)
    assert kernel_size % 2 == 1
    return kernel_size


class EcaModule(nn.Module):
    def __init__(self, channels=None, kernel_size=3, gamma=2, beta=1, act_layer=None,
                 gate_layer="sigmoid", rd_ratio=1 / 8, rd_channels=None, rd_divisor=8,
                 use_mlp=False):
        super().__init__()
        kernel_size = _kernel_size(channels, kernel_size, gamma, beta)
        padding = (kernel_size - 1) // 2
        if use_mlp:
            assert channels is not None
            if rd_channels is None:
                rd_channels = make_divisible(channels * rd_ratio, divisor=rd_divisor)
            act_layer = act_layer or nn.ReLU
            self.conv = nn.Conv1d(1, rd_channels, kernel_size=1, padding=0, bias=True)
            self.act = create_act_layer(act_layer)
            self.conv2 = nn.Conv1d(rd_channels, 1, kernel_size=kernel_size, padding=padding,
                                   bias=True)
        else:
            self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=padding, bias=False)
            self.act = None
            self.conv2 = None
        self.gate = create_act_layer(gate_layer)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, C]`."""
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        if self.conv2 is not None:
            y = self.act(y)
            y = self.conv2(y)
        return self.gate(y).view(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gates(x)[:, :, None, None].expand_as(x)


class CecaModule(nn.Module):
    def __init__(self, channels=None, kernel_size=3, gamma=2, beta=1, act_layer=None,
                 gate_layer="sigmoid"):
        super().__init__()
        kernel_size = _kernel_size(channels, kernel_size, gamma, beta)
        self.padding = (kernel_size - 1) // 2
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=0,
                              bias=act_layer is not None)
        self.gate = create_act_layer(gate_layer)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = F.pad(y, (self.padding, self.padding), mode="circular")
        return self.gate(self.conv(y)).view(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gates(x)[:, :, None, None].expand_as(x)
