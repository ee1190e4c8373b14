"""PyTorch reference for kevinzakka/recurrent-visual-attention's `RecurrentAttention`
(model.py, modules.py), NCHW, with its parameter names (`sensor.fc1..fc4`, `rnn.i2h`, `rnn.h2h`,
`locator.fc`, `locator.fc_lt`, `classifier.fc`, `baseliner.fc`) and structure: the retina crops
at `long(0.5 * ((l + 1) * H))` (H for both axes) from the image zero-padded by half the patch,
average-pools the coarser patches to g x g; `forward(x, l_t_prev, h_t_prev, last)` is one step.
`legacy=True` is the code of April 2018 (commit 3f04ccb) that saved the repository's shipped
checkpoint `ram_6_8x8_2_ckpt.pth.tar`: a one-layer `locator.fc`, the sample squashed by tanh
(`tanh(tanh(fc(h)) + noise)`), the baseline rectified, log pi at the squashed sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal


def foveate(x: torch.Tensor, loc: torch.Tensor, g: int, k: int, s: int) -> torch.Tensor:
    """`Retina.foveate`: x `[B, C, H, W]`, loc `[B, 2]` -> `[B, k * C * g * g]`."""
    phi, size = [], g
    for _ in range(k):
        start = (0.5 * ((loc + 1.0) * x.shape[2])).long()
        end = start + size
        padded = F.pad(x, (size // 2, size // 2, size // 2, size // 2))
        phi.append(torch.stack([padded[i, :, start[i, 1]:end[i, 1], start[i, 0]:end[i, 0]]
                                for i in range(x.shape[0])]))
        size = int(s * size)
    phi = [phi[0]] + [F.avg_pool2d(p, p.shape[-1] // g) for p in phi[1:]]
    return torch.cat(phi, 1).view(x.shape[0], -1)


class GlimpseNetwork(nn.Module):
    def __init__(self, h_g: int, h_l: int, g: int, k: int, s: int, c: int):
        super().__init__()
        self.g, self.k, self.s = g, k, s
        self.fc1 = nn.Linear(k * g * g * c, h_g)
        self.fc2 = nn.Linear(2, h_l)
        self.fc3 = nn.Linear(h_g, h_g + h_l)
        self.fc4 = nn.Linear(h_l, h_g + h_l)

    def forward(self, x: torch.Tensor, l_t_prev: torch.Tensor) -> torch.Tensor:
        phi = foveate(x, l_t_prev, self.g, self.k, self.s)
        what = self.fc3(F.relu(self.fc1(phi)))
        where = self.fc4(F.relu(self.fc2(l_t_prev.view(l_t_prev.size(0), -1))))
        return F.relu(what + where)


class CoreNetwork(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.i2h = nn.Linear(input_size, hidden_size)
        self.h2h = nn.Linear(hidden_size, hidden_size)

    def forward(self, g_t: torch.Tensor, h_t_prev: torch.Tensor) -> torch.Tensor:
        return F.relu(self.i2h(g_t) + self.h2h(h_t_prev))


class LocationNetwork(nn.Module):
    def __init__(self, input_size: int, output_size: int, std: float, legacy: bool = False):
        super().__init__()
        self.std, self.legacy = std, legacy
        if legacy:
            self.fc = nn.Linear(input_size, output_size)
        else:
            self.fc = nn.Linear(input_size, input_size // 2)
            self.fc_lt = nn.Linear(input_size // 2, output_size)

    def mean(self, h_t: torch.Tensor) -> torch.Tensor:
        if self.legacy:
            return torch.tanh(self.fc(h_t.detach()))
        return torch.tanh(self.fc_lt(F.relu(self.fc(h_t.detach()))))

    def forward(self, h_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.mean(h_t)
        l_t = Normal(mu, self.std).rsample().detach()
        if self.legacy:
            l_t = torch.tanh(l_t)
        log_pi = Normal(mu, self.std).log_prob(l_t).sum(dim=1)
        return log_pi, l_t if self.legacy else torch.clamp(l_t, -1, 1)

    def location(self, h_t: torch.Tensor) -> torch.Tensor:
        """The location without noise: the clipped (legacy: tanh-squashed) mean."""
        mu = self.mean(h_t)
        return torch.tanh(mu) if self.legacy else mu.clamp(-1, 1)


class Linear1(nn.Module):
    """`ActionNetwork` and `BaselineNetwork`'s one layer, `fc` (the action network's
    log-softmax and the baseline's detach are applied by `RecurrentAttention.forward`)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)


class RecurrentAttention(nn.Module):
    def __init__(self, g: int, k: int, s: int, c: int, h_g: int, h_l: int, std: float,
                 hidden_size: int, num_classes: int, legacy: bool = False):
        super().__init__()
        self.legacy = legacy
        self.sensor = GlimpseNetwork(h_g, h_l, g, k, s, c)
        self.rnn = CoreNetwork(hidden_size, hidden_size)
        self.locator = LocationNetwork(hidden_size, 2, std, legacy)
        self.classifier = Linear1(hidden_size, num_classes)
        self.baseliner = Linear1(hidden_size, 1)

    def forward(self, x, l_t_prev, h_t_prev, last: bool = False):
        h_t = self.rnn(self.sensor(x, l_t_prev), h_t_prev)
        log_pi, l_t = self.locator(h_t)
        b_t = self.baseliner.fc(h_t.detach()).squeeze()
        b_t = F.relu(b_t) if self.legacy else b_t
        if last:
            return h_t, l_t, b_t, F.log_softmax(self.classifier.fc(h_t), dim=1), log_pi
        return h_t, l_t, b_t, log_pi
