"""PyTorch reference for the non-local block (NCHW), written from the paper and the facts of
AlexHex7/Non-local_pytorch: one class for its four per-mode files, same parameter names.

The concatenation mode builds the full `[B, 2 inter, Lq, Lk]` pairwise tensor, as the
reference does, so it checks the split-weight form of the library independently.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: (nn.MaxPool1d, 2), 2: (nn.MaxPool2d, (2, 2)), 3: (nn.MaxPool3d, (1, 2, 2))}


class NonLocalBlock(nn.Module):
    def __init__(self, in_channels: int, dimension: int, mode: str = "embedded",
                 inter_channels: int | None = None, sub_sample: bool = True,
                 bn_layer: bool = True, use_scale: bool = False):
        super().__init__()
        self.mode, self.use_scale = mode, use_scale
        self.inter = inter_channels or max(in_channels // 2, 1)
        conv = _CONV[dimension]
        pool_cls, window = _POOL[dimension]

        def maybe_pooled(module: nn.Module) -> nn.Module:
            return nn.Sequential(module, pool_cls(window)) if sub_sample else module

        self.g = maybe_pooled(conv(in_channels, self.inter, 1))
        if mode == "gaussian":
            self.phi = pool_cls(window) if sub_sample else nn.Identity()
        else:
            self.theta = conv(in_channels, self.inter, 1)
            self.phi = maybe_pooled(conv(in_channels, self.inter, 1))
        if mode == "concatenate":
            self.concat_project = nn.Sequential(
                nn.Conv2d(2 * self.inter, 1, 1, bias=False), nn.ReLU()
            )
        if bn_layer:
            self.W = nn.Sequential(conv(self.inter, in_channels, 1), _BN[dimension](in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = conv(self.inter, in_channels, 1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, *S]` -> `[B, Lq, Lk]`."""
        b = x.shape[0]
        theta = x if self.mode == "gaussian" else self.theta(x)
        theta = theta.reshape(b, theta.shape[1], -1)  # [B, Ck, Lq]
        phi = self.phi(x).reshape(b, theta.shape[1], -1)  # [B, Ck, Lk]
        if self.mode == "concatenate":
            lq, lk = theta.shape[-1], phi.shape[-1]
            pairs = torch.cat([theta[..., None].expand(-1, -1, lq, lk),
                               phi[:, :, None, :].expand(-1, -1, lq, lk)], dim=1)
            return self.concat_project(pairs).squeeze(1) / lk
        f = theta.transpose(1, 2) @ phi
        if self.mode == "dot":
            return f / f.shape[-1]
        if self.use_scale:
            f = f / math.sqrt(theta.shape[1])
        return torch.softmax(f, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        g = self.g(x).reshape(b, self.inter, -1).transpose(1, 2)  # [B, Lk, inter]
        y = (self.weights(x) @ g).transpose(1, 2).reshape(b, self.inter, *x.shape[2:])
        return self.W(y) + x
