"""PyTorch reference for deformable convolution (NCHW), pure torch: an explicit bilinear gather
(im2col) with torchvision's `ops.deform_conv2d` arguments and semantics, read from
`torchvision/ops/deform_conv.py` and `torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp`
(`bilinear_interpolate`, `deformable_im2col_kernel`), and modules with the parameter names of
torchvision's `DeformConv2d` and mmcv's `DeformConv2dPack` / `ModulatedDeformConv2dPack`
(`mmcv/ops/deform_conv.py`, `mmcv/ops/modulated_deform_conv.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair


def _bilinear_columns(input, y, x):
    """`input` [B, G, Cg, H, W] sampled at y, x [B, G, K, Ho, Wo] -> [B, G, Cg, K, Ho, Wo]:
    torchvision's `bilinear_interpolate`, each neighbour outside the image counting 0. Its
    range check (0 when y <= -1, y >= H, x <= -1 or x >= W) changes no value, so it is left
    out: then autograd's offset gradient is that of torchvision's hand-written backward
    (`get_coordinate_weight`, without the check) also at y = -1 or x = -1 exactly, where a
    masked version gives 0."""
    b, g, cg, height, width = input.shape
    flat = input.reshape(b, g, cg, height * width)
    y_low, x_low = torch.floor(y), torch.floor(x)
    ly, lx = y - y_low, x - x_low
    out = torch.zeros((b, g, cg, *y.shape[2:]), dtype=input.dtype)
    for dy, dx, weight in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                           (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = (y_low + dy).long(), (x_low + dx).long()
        valid = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).flatten(2)
        values = torch.gather(flat, 3, index[:, :, None].expand(-1, -1, cg, -1))
        out = out + (weight * valid)[:, :, None] * values.reshape(out.shape)
    return out


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """torchvision's `ops.deform_conv2d`: input [B, C, H, W], offset [B, 2 * G * kh * kw, Ho, Wo]
    ((dy, dx) per tap per offset group), weight [O, C / groups, kh, kw], bias [O], mask
    [B, G * kh * kw, Ho, Wo] -> [B, O, Ho, Wo]."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    b, channels, height, width = input.shape
    out_channels, per_group, kh, kw = weight.shape
    groups, offset_groups = channels // per_group, offset.shape[1] // (2 * kh * kw)
    ho, wo = offset.shape[2:]
    off = offset.reshape(b, offset_groups, kh * kw, 2, ho, wo)
    rows = (torch.arange(ho, dtype=input.dtype) * sh - ph)[None, :, None]
    rows = rows + (torch.arange(kh, dtype=input.dtype) * dh)[:, None, None]  # [kh, Ho, 1]
    cols = (torch.arange(wo, dtype=input.dtype) * sw - pw)[None, None, :]
    cols = cols + (torch.arange(kw, dtype=input.dtype) * dw)[:, None, None]  # [kw, 1, Wo]
    y = rows[:, None].expand(kh, kw, ho, wo).reshape(kh * kw, ho, wo) + off[:, :, :, 0]
    x = cols[None].expand(kh, kw, ho, wo).reshape(kh * kw, ho, wo) + off[:, :, :, 1]
    columns = _bilinear_columns(
        input.reshape(b, offset_groups, channels // offset_groups, height, width), y, x)
    if mask is not None:
        columns = columns * mask.reshape(b, offset_groups, 1, kh * kw, ho, wo)
    columns = columns.reshape(b, groups, per_group * kh * kw, ho * wo)
    kernel = weight.reshape(groups, out_channels // groups, per_group * kh * kw)
    out = torch.einsum("gok,bgkl->bgol", kernel, columns).reshape(b, out_channels, ho, wo)
    return out if bias is None else out + bias[:, None, None]


class DeformConv2d(nn.Module):
    """torchvision's `ops.DeformConv2d`: `weight`, `bias`; `forward(input, offset, mask=None)`."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *_pair(kernel_size)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.weight[0].numel()),
                             1 / math.sqrt(self.weight[0].numel()))

    def forward(self, input, offset, mask=None):
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)


class DeformConv2dPack(DeformConv2d):
    """mmcv's `DeformConv2dPack` (DCNv1; mmcv's `DeformConv2d` has no bias): `conv_offset`
    predicts `deform_groups * 2 * kh * kw` offset channels, zero-initialised."""

    _mask = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        taps = deform_groups * math.prod(_pair(kernel_size))
        self.conv_offset = nn.Conv2d(in_channels, taps * (3 if self._mask else 2), kernel_size,
                                     stride=stride, padding=padding, dilation=dilation,
                                     bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        out = self.conv_offset(x)
        mask = None
        if self._mask:
            o1, o2, mask = torch.chunk(out, 3, dim=1)
            out, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(mask)
        return super().forward(x, out, mask)


class ModulatedDeformConv2dPack(DeformConv2dPack):
    """mmcv's `ModulatedDeformConv2dPack` (DCNv2, bias by default): `conv_offset` predicts
    `3 * deform_groups * kh * kw` channels; `o1, o2, mask = chunk(3)`, offset = `cat(o1, o2)`,
    mask = sigmoid."""

    _mask = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, deform_groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deform_groups, bias)
