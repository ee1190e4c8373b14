"""PyTorch references for DANet (NCHW), written from the paper and REFERENCES.md.

Parameter names are those of junfu1115/DANet (`query_conv`, `key_conv`, `value_conv`, `gamma`;
the head's `conv5a.0/1`, ..., `conv6.1`), so their state dicts feed `from_torch` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def pam(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k `[B, Cqk, H, W]`, v `[B, Cv, H, W]` -> `[B, Cv, H, W]`, with batched matmuls."""
    b, _, h, w = q.shape
    queries = q.flatten(2).transpose(1, 2)  # [B, L, Cqk]
    energy = torch.bmm(queries, k.flatten(2))  # [B, L, L]: query i, key j
    att = torch.softmax(energy, dim=-1)
    out = torch.bmm(v.flatten(2), att.transpose(1, 2))  # [B, Cv, L]
    return out.view(b, -1, h, w)


def cam(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, C, H, W]`, with the reference's max-minus-energy step."""
    b, c, h, w = x.shape
    flat = x.flatten(2)  # [B, C, L]
    energy = torch.bmm(flat, flat.transpose(1, 2))  # [B, C, C]
    energy = energy.max(dim=-1, keepdim=True).values - energy
    return torch.bmm(torch.softmax(energy, dim=-1), flat).view(b, c, h, w)


class PositionAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // reduction, 1)
        self.key_conv = nn.Conv2d(channels, channels // reduction, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = pam(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma * attended + x


class ChannelAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * cam(x) + x


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def _dropout_conv(cin: int, cout: int, p: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(p), nn.Conv2d(cin, cout, 1))


class DANetHead(nn.Module):
    def __init__(self, channels: int, out_channels: int, dropout: float = 0.1):
        super().__init__()
        inter = channels // 4
        self.conv5a = _conv_bn_relu(channels, inter)
        self.conv5c = _conv_bn_relu(channels, inter)
        self.sa = PositionAttention(inter)
        self.sc = ChannelAttention()
        self.conv51 = _conv_bn_relu(inter, inter)
        self.conv52 = _conv_bn_relu(inter, inter)
        self.conv6 = _dropout_conv(inter, out_channels, dropout)
        self.conv7 = _dropout_conv(inter, out_channels, dropout)
        self.conv8 = _dropout_conv(inter, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sa = self.conv51(self.sa(self.conv5a(x)))
        sc = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa + sc), self.conv6(sa), self.conv7(sc)
