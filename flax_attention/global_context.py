"""Global context attention: GCNet's global context block, as timm's `GlobalContext`.

Cao, Xu, Lin, Wei, Hu: "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
ICCV Workshops 2019 (arXiv:1904.11492); the form and the parameter names are timm 1.0.31's
`timm/layers/global_context.py`, so `flax_attention.interop.torch.from_torch` loads the state
dicts of timm's `GlobalContext` (and, nested, the `se` module of timm's GC-ResNets).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention._checks import check_declared_channels, check_image
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.global_context import global_context
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    image_input,
    layer_norm,
    nested,
    register,
)
from flax_attention.layers import PointwiseConv, make_divisible, numerics

__all__ = ["GlobalContext"]


_ATTN_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # timm: kaiming_normal_


class ConvMlp(nn.Module):
    """timm's `ConvMlp(C, hidden, norm_layer=LayerNorm2d)` on a `[B, C]` context vector:
    `fc1` (C -> hidden, bias), `norm` (LayerNorm, eps 1e-6), the activation, `fc2`
    (hidden -> C, bias). The 1x1 convolutions keep `nn.Conv`'s `[1, 1, I, O]` kernels;
    `zero_last` starts `fc2`'s kernel at zero (timm does so for `mlp_add`)."""

    hidden: int
    act_layer: Activation = nn.relu
    zero_last: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        """`[B, C]` -> `[B, C]`."""
        channels = v.shape[-1]
        v = PointwiseConv(self.hidden, name="fc1", **numerics(self))(v)
        # Two-pass variance, as torch's LayerNorm (Flax's one-pass loses digits at large means).
        v = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(v)
        v = activation_function(self.act_layer)(v)
        last_init = nn.initializers.zeros if self.zero_last else nn.initializers.lecun_normal()
        return PointwiseConv(channels, kernel_init=last_init, name="fc2", **numerics(self))(v)


class GlobalContext(nn.Module):
    """The global context block (timm's `GlobalContext`).

    Context modelling: `conv_attn` (1x1 conv C -> 1, bias) gives one logit per position, a
    softmax over all H * W positions turns them into weights, and the context `[B, C]` is the
    weighted sum of `x` (with `use_attn=False`: the spatial mean). Transform: `mlp_scale` and/or
    `mlp_add`, each `fc1` (C -> rd_channels) -> LayerNorm (eps 1e-6) -> ReLU -> `fc2`. Fusion:
    `x * gate(mlp_scale(context)) + mlp_add(context)`. timm's defaults (scale fusion only, GC
    ratio 1/8) differ from the paper's (add fusion, ratio 1/16); `fuse_add=True,
    fuse_scale=False` is timm's `gca` (the paper's block). The softmax weights `[B, H, W]`
    (float32) are sown as ("intermediates", "attention") when `use_attn`.

    Differences from timm: `act_layer` and `gate_layer` are timm's names
    (`functional.activations.ACTIVATIONS`) or functions, not module classes; timm's
    `init_last_zero` is left out (timm stores it and never uses it); the softmax and the pooling
    run in float32 under bfloat16.

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      use_attn: attention pooling (else average pooling).
      fuse_add: add `mlp_add(context)` to every position (its `fc2` kernel starts at zero).
      fuse_scale: scale every position by `gate(mlp_scale(context))`.
      rd_ratio: hidden width of the MLPs as a fraction of C, when `rd_channels` is None.
      rd_channels: hidden width of the MLPs (0: C, as timm's `ConvMlp` reads it).
      rd_divisor: the hidden width is rounded to a multiple of this (timm's `make_divisible`
        with `round_limit=0`).
      act_layer: the MLPs' activation.
      gate_layer: the gate of the scale fusion.
    """

    channels: int | None = None
    _: dataclasses.KW_ONLY
    use_attn: bool = True
    fuse_add: bool = False
    fuse_scale: bool = True
    rd_ratio: float = 1.0 / 8
    rd_channels: int | None = None
    rd_divisor: int = 1
    act_layer: Activation = nn.relu
    gate_layer: Activation = "sigmoid"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def hidden_channels(self, channels: int) -> int:
        """The MLPs' hidden width for an input of `channels` channels."""
        if self.rd_channels is not None:
            return self.rd_channels or channels  # timm's ConvMlp reads 0 hidden features as C
        return make_divisible(channels * self.rd_ratio, self.rd_divisor, round_limit=0.0)

    @nn.nowrap
    def _mlp(self, channels: int, name: str) -> ConvMlp:
        return ConvMlp(self.hidden_channels(channels), self.act_layer, name == "mlp_add",
                       self.dtype, self.param_dtype, self.precision, name=name)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        check_declared_channels("channels", self.channels, x)
        channels = x.shape[-1]
        logits = None
        if self.use_attn:
            logits = PointwiseConv(1, kernel_init=_ATTN_INIT, name="conv_attn",
                                   **numerics(self))(x)[..., 0]
        mlp_scale = self._mlp(channels, "mlp_scale") if self.fuse_scale else None
        mlp_add = self._mlp(channels, "mlp_add") if self.fuse_add else None
        if self.dtype is not None:
            x = x.astype(self.dtype)
        out, weights = global_context(x, logits, mlp_scale, mlp_add,
                                      activation_function(self.gate_layer, "gate_layer"),
                                      self.precision)
        if weights is not None:
            self.sow("intermediates", "attention", weights)
        return out


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are timm's: `conv_attn.{weight,bias}`, `mlp_scale.{fc1,norm,fc2}.{weight,bias}`,
# `mlp_add.*` likewise (`se.*` inside timm's GC-ResNet blocks, via the blocks' converter).


def global_context_rules(module: GlobalContext) -> Rules:
    mlp = conv(("fc1",), "fc1") | layer_norm(("norm",), "norm") | conv(("fc2",), "fc2")
    rules: Rules = conv(("conv_attn",), "conv_attn") if module.use_attn else {}
    for name, used in (("mlp_scale", module.fuse_scale), ("mlp_add", module.fuse_add)):
        if used:
            rules |= nested(mlp, (name,), name)
    return rules


def _global_context_inputs(module: GlobalContext, shapes: Shapes
                           ) -> tuple[jax.ShapeDtypeStruct]:
    for key in ("conv_attn.weight", "mlp_scale.fc1.weight", "mlp_add.fc1.weight"):
        if key in shapes:
            return image_input(shapes, key)
    raise ValueError(f"state_dict has no weight to read the channels of {module!r} from")


register(GlobalContext)(Converter(global_context_rules, _global_context_inputs))
