"""PyTorch reference for Effective Squeeze-Excitation (NCHW), written from timm 1.0.31's
`timm/layers/squeeze_excite.py` (`EffectiveSEModule`): one 1x1 conv `fc` with bias, the hard
sigmoid gate (`nn.Hardsigmoid`), the experimental `add_maxpool`."""

from __future__ import annotations

import torch
from torch import nn

from tests.reference.eca import create_act_layer


class EffectiveSEModule(nn.Module):
    def __init__(self, channels, add_maxpool=False, gate_layer="hard_sigmoid", **_):
        super().__init__()
        self.add_maxpool = add_maxpool
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, padding=0)
        self.gate = create_act_layer(gate_layer)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, C]`."""
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        return self.gate(self.fc(x_se)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gates(x)[:, :, None, None]
