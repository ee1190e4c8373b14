"""PyTorch reference for spatial transformers (NCHW), written from the paper and REFERENCES.md.

The sampling itself is torch's own `F.affine_grid` / `F.grid_sample`, which the tests call
directly. `TutorialSTN` is the spatial transformer of the PyTorch STN tutorial, with its
parameter names (`localization.0`, `localization.3`, `fc_loc.0`, `fc_loc.2`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TutorialSTN(nn.Module):
    """The tutorial's localization network, `fc_loc` and `stn()` for 1-channel 28 x 28 input."""

    def __init__(self, out_hw: tuple[int, int] | None = None, align_corners: bool = False):
        super().__init__()
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        self.fc_loc = nn.Sequential(nn.Linear(10 * 3 * 3, 32), nn.ReLU(True), nn.Linear(32, 6))
        with torch.no_grad():  # the identity transform at the start
            self.fc_loc[2].weight.zero_()
            self.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
        self.out_hw = out_hw
        self.align_corners = align_corners

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 1, 28, 28]` -> `[B, 2, 3]`."""
        features = self.localization(x).flatten(1)  # the tutorial's view(-1, 10 * 3 * 3)
        return self.fc_loc(features).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tutorial's `stn(x)`: `[B, 1, 28, 28]` -> `[B, 1, h, w]`."""
        theta = self.theta(x)
        size = x.shape if self.out_hw is None else (*x.shape[:2], *self.out_hw)
        grid = F.affine_grid(theta, size, align_corners=self.align_corners)
        return F.grid_sample(x, grid, align_corners=self.align_corners)


class TutorialNet(TutorialSTN):
    """The tutorial's whole `Net`: `stn`, then conv1 - pool - ReLU, conv2 - `conv2_drop` - pool
    - ReLU, fc1 - ReLU - dropout, fc2, log-softmax (keys `conv1`, `conv2`, `fc1`, `fc2`)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.view(-1, 320)))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)
