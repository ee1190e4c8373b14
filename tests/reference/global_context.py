"""PyTorch reference for Global Context attention (NCHW), after timm 1.0.31
`timm/layers/global_context.py` (`GlobalContext`) and the parts of `timm/layers/mlp.py`
(`ConvMlp`) and `timm/layers/norm.py` (`LayerNorm2d`, eps 1e-6) it uses. Class names,
constructor arguments, defaults and parameter names are timm's; `device`/`dtype` are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.eca import make_divisible


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """1x1 conv -> norm -> act -> (dropout) -> 1x1 conv, both convs with bias."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.ReLU,
                 norm_layer=None, bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=bias)
        self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1, bias=bias)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


class GlobalContext(nn.Module):
    def __init__(self, channels: int, use_attn: bool = True, fuse_add: bool = False,
                 fuse_scale: bool = True, init_last_zero: bool = False, rd_ratio: float = 1.0 / 8,
                 rd_channels: int | None = None, rd_divisor: int = 1, act_layer=nn.ReLU,
                 gate_layer=nn.Sigmoid):
        super().__init__()
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=True) if use_attn else None
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        mlp = dict(act_layer=act_layer, norm_layer=LayerNorm2d)
        self.mlp_add = ConvMlp(channels, rd_channels, **mlp) if fuse_add else None
        self.mlp_scale = ConvMlp(channels, rd_channels, **mlp) if fuse_scale else None
        self.gate = gate_layer()
        self.init_last_zero = init_last_zero
        self.reset_parameters()

    def reset_parameters(self):
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        if self.mlp_add is not None:
            nn.init.zeros_(self.mlp_add.fc2.weight)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax context weights `[B, H, W]` (not part of timm)."""
        B, _, H, W = x.shape
        return F.softmax(self.conv_attn(x).reshape(B, H * W), dim=-1).reshape(B, H, W)

    def forward(self, x):
        B, C, H, W = x.shape
        if self.conv_attn is not None:
            attn = self.conv_attn(x).reshape(B, 1, H * W)
            attn = F.softmax(attn, dim=-1).unsqueeze(3)
            context = x.reshape(B, C, H * W).unsqueeze(1) @ attn
            context = context.view(B, C, 1, 1)
        else:
            context = x.mean(dim=(2, 3), keepdim=True)
        if self.mlp_scale is not None:
            x = x * self.gate(self.mlp_scale(context))
        if self.mlp_add is not None:
            x = x + self.mlp_add(context)
        return x
