"""PyTorch reference for criss-cross attention (CCNet, Huang et al. 2019), NCHW.

The pure-torch formulation: column energies by bmm over the B*W columns with -inf on the
position itself, row energies by bmm over the B*H rows, concatenated, ONE softmax, split, and
two bmm aggregations. `RCCAModule` follows CCNet's head, with InPlaceABNSync replaced by
`InPlaceABN`, the pure-torch form of mapillary/inplace_abn's op (a BatchNorm with the scale
`|weight| + eps`, then its default activation, leaky ReLU of slope 0.01) in the same module, so
the parameter names are CCNet's (`conva.0`, `conva.1`, `cca.*`, `convb.*`, `bottleneck.0/1/3`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _columns(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B*W, H, C]`."""
    b, c, h, w = x.shape
    return x.permute(0, 3, 2, 1).reshape(b * w, h, c)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B*H, W, C]`."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h, w, c)


def criss_cross_weights(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k `[B, C, H, W]` -> (column weights `[B, H, W, H]`, row weights `[B, H, W, W]`)."""
    b, _, h, w = q.shape
    self_mask = torch.diag(torch.full((h,), float("-inf"))).unsqueeze(0)
    energy_h = torch.bmm(_columns(q), _columns(k).transpose(1, 2)) + self_mask  # [B*W, H, H]
    energy_h = energy_h.view(b, w, h, h).permute(0, 2, 1, 3)
    energy_w = torch.bmm(_rows(q), _rows(k).transpose(1, 2)).view(b, h, w, w)
    attention = F.softmax(torch.cat([energy_h, energy_w], dim=3), dim=3)
    return attention[..., :h], attention[..., h:]


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k `[B, C, H, W]`, v `[B, C', H, W]` -> `[B, C', H, W]`."""
    b, c, h, w = v.shape
    att_h, att_w = criss_cross_weights(q, k)
    att_h = att_h.permute(0, 2, 1, 3).reshape(b * w, h, h)
    out_h = torch.bmm(att_h, _columns(v)).view(b, w, h, c).permute(0, 3, 2, 1)
    out_w = torch.bmm(att_w.reshape(b * h, w, w), _rows(v)).view(b, h, w, c).permute(0, 3, 1, 2)
    return out_h + out_w


class CrissCrossAttention(nn.Module):
    def __init__(self, in_dim: int, reduction: int = 8):
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, in_dim // reduction, 1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // reduction, 1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma * out + x


class InPlaceABN(nn.BatchNorm2d):
    """mapillary/inplace_abn's `InPlaceABN(Sync)` with BatchNorm2d's keys: batch normalisation
    scaled by `|weight| + eps` (not `weight`), then `activation` ("leaky_relu" with slope 0.01,
    its default, or "identity"); running statistics as BatchNorm2d's (unbiased variance)."""

    def __init__(self, num_features: int, activation: str = "leaky_relu", eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps,
                         self.bias, self.training, self.momentum, self.eps)
        return F.leaky_relu(y, 0.01) if self.activation == "leaky_relu" else y


def to_inplace_abn(module: nn.Module) -> nn.Module:
    """Replaces every plain BatchNorm2d inside `module` by an `InPlaceABN` without activation
    (CCNet's `BatchNorm2d = partial(InPlaceABNSync, activation='identity')`), in place."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, InPlaceABN(child.num_features, "identity", child.eps))
        else:
            to_inplace_abn(child)
    return module


def _conv_abn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         InPlaceABN(c_out))


class RCCAModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_classes: int | None,
                 recurrence: int = 2, dropout: float = 0.1):
        super().__init__()
        inter = in_channels // 4
        self.recurrence = recurrence
        self.conva = _conv_abn(in_channels, inter)
        self.cca = CrissCrossAttention(inter)
        self.convb = _conv_abn(inter, inter)
        head = [*_conv_abn(in_channels + inter, out_channels), nn.Dropout2d(dropout)]
        if num_classes is not None:
            head.append(nn.Conv2d(out_channels, num_classes, 1))
        self.bottleneck = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conva(x)
        for _ in range(self.recurrence):
            out = self.cca(out)
        return self.bottleneck(torch.cat([x, self.convb(out)], dim=1))
