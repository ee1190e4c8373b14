"""Selective Kernel convolution: branches of different receptive field mixed by attention.

Li, Wang, Hu, Yang: "Selective Kernel Networks", CVPR 2019; the form here is timm's
(`timm/layers/selective_kernel.py`, `SelectiveKernel` and `SelectiveKernelAttn`, timm 1.0.31):
the input channels are split across the paths (`split_input`), a 5x5 branch is a 3x3 with
dilation 2 (`keep_3x3`), each path is conv + BatchNorm + ReLU with the module's stride, and the
attention is sum of paths -> global average -> `fc_reduce` -> BatchNorm -> ReLU -> `fc_select`
-> softmax over the paths. NHWC here, NCHW there; parameter names follow timm so
`flax_attention.interop.torch.from_torch` loads its state dicts (`paths.N.conv`, `paths.N.bn`,
`attn.fc_reduce`, `attn.bn`, `attn.fc_select`; skresnet's `conv1.paths.*` nest them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention import layers
from flax_attention._checks import (
    check_declared_channels,
    check_divisible,
    check_image,
    check_rank,
)
from flax_attention.functional import selective_kernel as F
from flax_attention.interop.torch import (
    Converter,
    Rule,
    Rules,
    Shapes,
    batch_norm,
    conv,
    nested,
    register,
)
from flax_attention.layers import make_divisible

__all__ = ["SelectiveKernel", "SelectiveKernelAttn"]


class SelectiveKernelAttn(nn.Module):
    """The select step (timm's `SelectiveKernelAttn`): per-channel softmax weights of the paths.

    `[B, P, H, W, C]` paths -> sum over P -> mean over H, W -> `fc_reduce` (C -> attn_channels,
    no bias) -> BatchNorm -> ReLU -> `fc_select` (attn_channels -> P * C, no bias) -> softmax
    over P. The 1x1 convolutions of timm act on a 1x1 map, so they are `nn.Dense` here.

    Differences from timm: NHWC paths `[B, P, H, W, C]` (timm's `[B, P, C, H, W]`), weights
    returned as `[B, P, C]` float32 (timm's `[B, P, C, 1, 1]` in the input dtype).

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      num_paths: P.
      attn_channels: the hidden width.
    """

    channels: int | None = None
    _: dataclasses.KW_ONLY
    num_paths: int = 2
    attn_channels: int = 32
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, paths: jax.Array, train: bool = False) -> jax.Array:
        """`[B, P, H, W, C]` -> `[B, P, C]` float32 weights summing to 1 over P."""
        check_rank("paths", paths, 5, "[B, P, H, W, C]")
        check_declared_channels("channels", self.channels, paths)
        if paths.shape[1] != self.num_paths:
            raise ValueError(f"paths must have num_paths ({self.num_paths}) entries on axis 1, "
                             f"got shape {tuple(paths.shape)}")
        dense = dict(use_bias=False, **layers.numerics(self))
        pooled = F.selective_kernel_fuse(paths)
        hidden = nn.Dense(self.attn_channels, name="fc_reduce", **dense)(pooled)
        hidden = layers.batch_norm(train, self.dtype, self.param_dtype, name="bn")(hidden)
        logits = nn.Dense(paths.shape[-1] * self.num_paths, name="fc_select",
                          **dense)(nn.relu(hidden))
        return F.selective_kernel_weights(logits, self.num_paths)


class _Conv(nn.Module):
    """`nn.Conv`'s parameter (`kernel` `[K, K, C / groups, O]`, no bias) around
    `functional.selective_kernel.branch_conv` (its kernel gradient is fast on the CPU)."""

    features: int
    kernel_size: int
    stride: int
    dilation: int
    padding: int
    groups: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        return F.branch_conv(x, kernel, stride=self.stride, dilation=self.dilation,
                             padding=self.padding, groups=self.groups, precision=self.precision)


class _ConvNormAct(nn.Module):
    """timm's `ConvNormAct` (names `conv`, `bn`) with its symmetric padding
    `((stride - 1) + dilation * (kernel - 1)) // 2`."""

    features: int
    kernel_size: int
    stride: int
    dilation: int
    groups: int
    act_layer: Callable[[jax.Array], jax.Array]
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pad = ((self.stride - 1) + self.dilation * (self.kernel_size - 1)) // 2
        x = _Conv(self.features, self.kernel_size, self.stride, self.dilation, pad, self.groups,
                  name="conv", **layers.numerics(self))(x)
        x = layers.batch_norm(train, self.dtype, self.param_dtype, name="bn")(x)
        return self.act_layer(x)


def _branches(kernel_size: int | Sequence[int] | None, dilation: int, keep_3x3: bool
              ) -> list[tuple[int, int]]:
    """timm's (kernel, dilation) of every path: [3, 5] by default; with `keep_3x3` a k x k
    kernel becomes a 3x3 with dilation `dilation * (k - 1) // 2`."""
    kernels = [3, 5] if kernel_size is None else kernel_size
    kernels = list(kernels) if isinstance(kernels, Sequence) else [kernels] * 2
    if not kernels or any(k < 3 or k % 2 == 0 for k in kernels):
        raise ValueError(f"kernel_size must be odd sizes >= 3, got {kernel_size!r}")
    if keep_3x3:
        return [(3, dilation * (k - 1) // 2) for k in kernels]
    return [(k, dilation) for k in kernels]


class SelectiveKernel(nn.Module):
    """Selective Kernel convolution (timm's `SelectiveKernel`).

    Split: the input (its channels cut into P equal blocks when `split_input`) goes through P
    paths `paths_N` = conv(kernel, dilation, stride, groups) + BatchNorm + `act_layer`, each with
    `out_channels` outputs. Fuse and select: `SelectiveKernelAttn` weights the paths per channel
    (softmax over P). Output: the weighted sum of the paths. The `[B, P, C]` float32 weights are
    sown as ("intermediates", "attention").

    Differences from timm: channels are inferred from the input (`in_channels` is optional);
    `aa_layer` and `drop_layer` are not supported; every entry of `kernel_size` is checked (timm
    checks the first); the attention's softmax is computed in float32 under bfloat16.

    Attributes:
      in_channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      out_channels: output channels; None: the input's.
      kernel_size: a kernel size per path, or one for two paths; None: [3, 5].
      stride: of every path's convolution.
      dilation: of the module; with `keep_3x3` it scales each path's dilation.
      groups: of every path's convolution (at most `out_channels`).
      rd_ratio, rd_channels, rd_divisor: the attention's hidden width, `rd_channels` or
        `make_divisible(out_channels * rd_ratio, rd_divisor)`.
      keep_3x3: every path a 3x3 convolution, larger kernels becoming dilations.
      split_input: split the input channels across the paths.
      act_layer: of the paths (the attention always uses ReLU, as timm's).
    """

    in_channels: int | None = None
    _: dataclasses.KW_ONLY
    out_channels: int | None = None
    kernel_size: int | Sequence[int] | None = None
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    keep_3x3: bool = True
    split_input: bool = True
    act_layer: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def branches(self) -> list[tuple[int, int]]:
        """The (kernel size, dilation) of every path."""
        return _branches(self.kernel_size, self.dilation, self.keep_3x3)

    @nn.nowrap
    def attn_channels(self, out_channels: int) -> int:
        return self.rd_channels or make_divisible(out_channels * self.rd_ratio, self.rd_divisor)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H', W', out_channels]` (H' = ceil(H / stride), likewise W')."""
        check_image("x", x)
        check_declared_channels("in_channels", self.in_channels, x)
        branches = self.branches()
        num_paths = len(branches)
        out_channels = self.out_channels or x.shape[-1]
        groups = min(out_channels, self.groups)
        inputs = (F.selective_kernel_split(x, num_paths) if self.split_input
                  else [x] * num_paths)
        check_divisible("path input channels", inputs[0].shape[-1], groups, "groups")
        check_divisible("out_channels", out_channels, groups, "groups")
        paths = [
            _ConvNormAct(out_channels, k, self.stride, d, groups, self.act_layer,
                         name=f"paths_{i}", **layers.numerics(self))(xi, train)
            for i, (xi, (k, d)) in enumerate(zip(inputs, branches, strict=True))
        ]
        attn = SelectiveKernelAttn(num_paths=num_paths,
                                   attn_channels=self.attn_channels(out_channels), name="attn",
                                   **layers.numerics(self))
        weights = attn(jnp.stack(paths, axis=1), train)
        self.sow("intermediates", "attention", weights)
        return F.selective_kernel_select(paths, weights)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are timm's: `paths.N.conv.weight`, `paths.N.bn.*`, `attn.fc_reduce.weight`, `attn.bn.*`,
# `attn.fc_select.weight`; the attention's 1x1 conv weights `[O, I, 1, 1]` become Dense kernels.


def _pointwise_kernel(a: np.ndarray) -> np.ndarray:
    """torch 1x1 conv `[O, I, 1, 1]` -> Flax Dense `[I, O]`."""
    if a.ndim != 4 or a.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight [O, I, 1, 1], got {a.shape}")
    return a[:, :, 0, 0].T


def _attn_rules(module: SelectiveKernelAttn) -> Rules:
    del module
    return {("params", name, "kernel"): Rule(f"{name}.weight", _pointwise_kernel)
            for name in ("fc_reduce", "fc_select")} | batch_norm(("bn",), "bn")


def _attn_inputs(module: SelectiveKernelAttn, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    channels = shapes["fc_select.weight"][0] // module.num_paths
    return (jax.ShapeDtypeStruct((1, module.num_paths, 1, 1, channels), jnp.float32),)


def _rules(module: SelectiveKernel) -> Rules:
    rules = nested(_attn_rules(None), ("attn",), "attn")
    for i in range(len(module.branches())):
        rules |= conv((f"paths_{i}", "conv"), f"paths.{i}.conv", bias=False)
        rules |= batch_norm((f"paths_{i}", "bn"), f"paths.{i}.bn")
    return rules


def _inputs(module: SelectiveKernel, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    out_channels, per_group = shapes["paths.0.conv.weight"][:2]
    channels = per_group * min(module.out_channels or out_channels, module.groups)
    if module.split_input:
        channels *= len(module.branches())
    return (jax.ShapeDtypeStruct((1, 1, 1, channels), jnp.float32),)


register(SelectiveKernelAttn)(Converter(_attn_rules, _attn_inputs))
register(SelectiveKernel)(Converter(_rules, _inputs))
