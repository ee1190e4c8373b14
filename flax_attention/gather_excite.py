"""Gather-excite attention.

Hu, Shen, Albanie, Sun, Vedaldi: "Gather-Excite: Exploiting Feature Context in Convolutional
Neural Networks", NeurIPS 2018 (hujie-frank/GENet, Caffe, partial); here in the form of timm's
`timm/layers/gather_excite.py` (`GatherExcite`, timm 1.0.31), whose parameter names `from_torch`
reads. A gather aggregates every channel over windows of side about twice the `extent` (over
the whole image for extent 0), an MLP mixes the channels, and the gates, resized back by
nearest interpolation, scale the input. The gather is parameter-free (average pooling, GE-θ-)
or, with `extra_params`, a stack of depthwise stride-2 convolutions with BatchNorm (GE-θ).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_declared_channels, check_image
from flax_attention.eca import ConvParams
from flax_attention.functional import gather_excite as F
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.effective_se import stat_dtype
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    register,
)
from flax_attention.layers import make_divisible

__all__ = ["GatherExcite"]



def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class ParametricGather(nn.Module):
    """timm's `gather` Sequential with `extra_params`: depthwise convolutions without bias
    (`conv1`, ...), each followed by a BatchNorm (`norm1`, ...) when `norm_layer`, and
    `act_layer` between them, not after the last.

    extent 0: one convolution of kernel `feat_size`, stride 1, padding `(k - 1) // 2` (timm's
    `create_conv2d` padding: for an odd `feat_size` equal to the input size the output keeps the
    input size, it is not a global pool). extent e > 0: `int(log2(e))` 3x3 convolutions of
    stride 2, padding 1 (`functional.gather_excite.depthwise_conv3x3_stride2`, with
    `nn.Conv`'s parameter layout).
    """

    extent: int
    feat_size: int | tuple[int, int] | None
    norm_layer: bool
    act_layer: Activation
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def layout(self) -> list[tuple[tuple[int, int], int]]:
        """(kernel, stride) of every convolution."""
        if self.extent == 0:
            if self.feat_size is None:
                raise ValueError("feat_size must be given for the global extent 0 with "
                                 "extra_params")
            return [(_pair(self.feat_size), 1)]
        return [((3, 3), 2)] * int(math.log2(self.extent))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, h, w, C]`."""
        convs = self.layout()
        channels = x.shape[-1]
        for i, (kernel, stride) in enumerate(convs, start=1):
            if stride == 2:
                weights, _ = ConvParams((3, 3, 1, channels), False, self.param_dtype,
                                        name=f"conv{i}")()
                x, weights = promote_dtype(x, weights, dtype=self.dtype)
                x = F.depthwise_conv3x3_stride2(x, weights)
            else:
                pads = [((k - 1) // 2,) * 2 for k in kernel]
                x = nn.Conv(channels, kernel, padding=pads, feature_group_count=channels,
                            use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            precision=self.precision, name=f"conv{i}")(x)
            if self.norm_layer:
                x = layers.batch_norm(train, self.dtype, self.param_dtype, name=f"norm{i}")(x)
            if i != len(convs):
                x = activation_function(self.act_layer)(x)
        return x


class ConvMlpParams(nn.Module):
    """The parameters of timm's `ConvMlp` (`fc1`: C -> R, `fc2`: R -> C, 1x1 with bias), as
    `[C, R]`, `[R]`, `[R, C]`, `[C]` (stored with `nn.Conv`'s layout)."""

    channels: int
    hidden: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, ...]:
        c, r = self.channels, self.hidden
        w1, b1 = ConvParams((1, 1, c, r), True, self.param_dtype, name="fc1")()
        w2, b2 = ConvParams((1, 1, r, c), True, self.param_dtype, name="fc2")()
        return w1.reshape(c, r), b1, w2.reshape(r, c), b2


class GatherExcite(nn.Module):
    """Gather-excite (timm's `GatherExcite`).

    `x * gate(resize(mlp(gather(x))))`: the gather (average pooling of window `2 extent - 1`
    and stride `extent`, the global mean for extent 0, or `ParametricGather` with
    `extra_params`), timm's `ConvMlp` `mlp` (1x1 convolutions C -> R -> C with bias, ReLU), the
    gate, and nearest interpolation back to `[H, W]` (torch's default "nearest"). With extent 0
    and no extra parameters it is squeeze-and-excitation with biases.

    Sown: the float32 gates as ("intermediates", "attention"), `[B, C]` when the gather is
    global, else their mean over C at full size, `[B, H, W]`, with the gates themselves,
    `[B, h, w, C]`, as ("intermediates", "gates").

    Differences from timm: the gather, the MLP and the gates are computed in float32 under
    bfloat16 (the parametric gather's convolutions run in `dtype`); `norm_layer` is a flag (timm
    only tests it for truth and always uses `BatchNorm2d`); timm 1.0.31's class cannot be
    constructed as shipped (it passes its `dd` kwargs positionally).

    Attributes:
      channels: timm's first argument, accepted so that timm's calls work: optional (C
        comes from the input); when given, it must equal C. The other fields are keyword-only.
      feat_size: the input size, needed by the extent-0 parametric gather (its kernel size).
      extra_params: the parametric gather (GE-θ) instead of pooling (GE-θ-).
      extent: 0 (global) or even.
      use_mlp: the `mlp` between the gather and the gate (otherwise the identity).
      rd_ratio, rd_channels, rd_divisor: R = `rd_channels`, else
        `make_divisible(C * rd_ratio, rd_divisor, round_limit=0)`.
      add_maxpool: parameter-free gather only: `0.5 mean + 0.5 max` pooling.
      act_layer: of the MLP and between the gather convolutions (a name or a callable).
      norm_layer: BatchNorm after every gather convolution.
      gate_layer: a name of timm's (`functional.activations.ACTIVATIONS`) or a callable.
    """

    channels: int | None = None
    _: dataclasses.KW_ONLY
    feat_size: int | tuple[int, int] | None = None
    extra_params: bool = False
    extent: int = 0
    use_mlp: bool = True
    rd_ratio: float = 1 / 16
    rd_channels: int | None = None
    rd_divisor: int = 1
    add_maxpool: bool = False
    act_layer: Activation = nn.relu
    norm_layer: bool = True
    gate_layer: Activation = "sigmoid"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def hidden_for(self, channels: int) -> int:
        return self.rd_channels or make_divisible(channels * self.rd_ratio, self.rd_divisor,
                                                  round_limit=0.0)

    @nn.nowrap
    def gather_module(self) -> ParametricGather:
        return ParametricGather(self.extent, self.feat_size, self.norm_layer, self.act_layer,
                                self.dtype, self.param_dtype, self.precision, name="gather")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`; `train` updates the gather's BatchNorm statistics."""
        check_image("x", x)
        check_declared_channels("channels", self.channels, x)
        F.check_extent(self.extent)
        gate_fn = activation_function(self.gate_layer, "gate_layer")
        channels = x.shape[-1]
        mlp = ()
        if self.use_mlp:
            mlp = ConvMlpParams(channels, self.hidden_for(channels), self.param_dtype,
                                name="mlp")()
        x, *mlp = promote_dtype(x, *mlp, dtype=self.dtype)
        if self.extra_params:
            gathered = self.gather_module()(x, train)
            gathered = gathered.astype(stat_dtype(gathered))
            if mlp:
                gathered = F.conv_mlp(gathered, *mlp, act=activation_function(self.act_layer),
                                      precision=self.precision)
            gates = gate_fn(gathered)
        else:
            gates = F.gather_excite_gates(x, *mlp, extent=self.extent,
                                          add_maxpool=self.add_maxpool,
                                          act=activation_function(self.act_layer),
                                          gate=gate_fn, precision=self.precision)
        out = F.excite_spatial(x, gates)
        self._sow(gates, x.shape[1:3])
        return out

    def _sow(self, gates: jax.Array, size: tuple[int, int]) -> None:
        if gates.shape[1:3] == (1, 1):
            self.sow("intermediates", "attention", gates[:, 0, 0])
            return
        self.sow("intermediates", "gates", gates)
        rows, cols = (F.nearest_indices(n, m) for n, m in zip(gates.shape[1:3], size,
                                                             strict=True))
        spatial = jnp.mean(gates, axis=-1)
        self.sow("intermediates", "attention", spatial[:, rows][:, :, cols])


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# timm's keys: `mlp.fc1.{weight,bias}`, `mlp.fc2.{weight,bias}` (1x1 convs); with extra_params
# `gather.conv<i>.weight` (depthwise, no bias) and `gather.norm<i>.*` (BatchNorm2d).

def gather_excite_rules(module: GatherExcite) -> Rules:
    rules: Rules = {}
    if module.extra_params:
        for i in range(1, len(module.gather_module().layout()) + 1):
            rules |= conv(("gather", f"conv{i}"), f"gather.conv{i}", bias=False)
            if module.norm_layer:
                rules |= batch_norm(("gather", f"norm{i}"), f"gather.norm{i}")
    if module.use_mlp:
        rules |= conv(("mlp", "fc1"), "mlp.fc1") | conv(("mlp", "fc2"), "mlp.fc2")
    return rules


def _gather_excite_inputs(module: GatherExcite, shapes: Shapes
                          ) -> tuple[jax.ShapeDtypeStruct]:
    """An input of the state dict's C, large enough for an extent-0 gather convolution."""
    if module.use_mlp:
        channels = shapes["mlp.fc1.weight"][1]
    else:
        channels = shapes["gather.conv1.weight"][0] if module.extra_params else 1
    side = max(_pair(module.feat_size)) if module.feat_size is not None else 1
    return (jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32),)


register(GatherExcite)(Converter(gather_excite_rules, _gather_excite_inputs))
