"""Efficient channel attention: ECA and circular ECA (CECA).

Wang, Wu, Zhu, Li, Zuo, Hu: "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
Networks", CVPR 2020 (BangguWu/ECANet); here in the form of timm's `timm/layers/eca.py`
(`EcaModule`, `CecaModule`, timm 1.0.31), whose parameter names `from_torch` reads. The global
average of every channel goes through one K-tap 1-D convolution along the channel axis (no
bias), and a sigmoid: a gate per channel from its K neighbours, with K adapted to C
(`functional.eca_kernel_size`). CECA pads that convolution circularly, so the first and last
channels are neighbours.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention._checks import check_image
from flax_attention.functional import eca as F
from flax_attention.functional.activations import Activation, activation_function
from flax_attention.functional.squeeze_excitation import excite
from flax_attention.interop.torch import Converter, Rules, Shapes, conv, register
from flax_attention.layers import make_divisible

__all__ = ["CecaModule", "ConvParams", "EcaModule"]


class ConvParams(nn.Module):
    """The kernel (and bias) of a convolution, created with `nn.Conv`'s layout and names but not
    applied: the channel attentions run their small gate convolutions in float32 in
    `functional`, on `[B, C]`-sized inputs.

    Attributes:
      kernel_shape: `nn.Conv`'s `[*K, I, O]`.
      use_bias: also create a bias `[O]` (zeros).
    """

    kernel_shape: tuple[int, ...]
    use_bias: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.kernel_shape,
                            self.param_dtype)
        if not self.use_bias:
            return kernel, None
        bias = self.param("bias", nn.initializers.zeros, self.kernel_shape[-1:],
                          self.param_dtype)
        return kernel, bias


class _AdaptiveKernel:
    """The kernel size of ECA and CECA, as timm's: adapted to `channels` when given (which
    overrides `kernel_size`), else `kernel_size`, else adapted to the input's C."""

    @nn.nowrap
    def kernel_size_for(self, channels: int) -> int:
        if self.channels is not None:
            return F.eca_kernel_size(self.channels, self.gamma, self.beta)
        if self.kernel_size is None:
            return F.eca_kernel_size(channels, self.gamma, self.beta)
        if self.kernel_size < 1 or self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        return self.kernel_size


class EcaModule(_AdaptiveKernel, nn.Module):
    """Efficient channel attention (timm's `EcaModule`).

    `x * sigmoid(conv1d(mean(x)))`: the `[B, C]` channel means, a bias-free 1-D convolution
    `conv` of K taps along the channel axis (zero padding), the gate. The `[B, C]` float32
    gates are sown as ("intermediates", "attention").

    Differences from timm: without `channels` and `kernel_size`, K is adapted to the input's C
    (timm's `EcaModule()` uses `kernel_size=3`; its networks always pass `channels`); the gates
    are computed in float32 under bfloat16.

    Attributes:
      channels: timm's `channels`: when given, K = `eca_kernel_size(channels, gamma, beta)`
        (whatever `kernel_size`) and the MLP mode's R is computed from it.
      kernel_size: K (odd), or None for `eca_kernel_size(C, gamma, beta)` of the input's C.
      gamma, beta: of the adaptive kernel size.
      act_layer: the hidden non-linearity of the MLP mode (ReLU when None); unused otherwise,
        as in timm.
      gate_layer: a name of timm's (`functional.activations.ACTIVATIONS`) or a callable.
      rd_ratio, rd_channels, rd_divisor: the MLP mode's hidden features R
        (`make_divisible(C * rd_ratio, rd_divisor)` unless `rd_channels`).
      use_mlp: timm's experimental MLP mode ("ecam"): `conv` becomes a 1x1 convolution 1 -> R
        with bias, then `act_layer`, then `conv2`, K taps R -> 1 with bias.
    """

    channels: int | None = None
    kernel_size: int | None = None
    gamma: float = 2
    beta: float = 1
    act_layer: Activation | None = None
    gate_layer: Activation = "sigmoid"
    rd_ratio: float = 1 / 8
    rd_channels: int | None = None
    rd_divisor: int = 8
    use_mlp: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.nowrap
    def hidden_for(self, channels: int) -> int:
        """R of the MLP mode."""
        if self.rd_channels is not None:
            return self.rd_channels
        return make_divisible((self.channels or channels) * self.rd_ratio, self.rd_divisor)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        channels = x.shape[-1]
        k = self.kernel_size_for(channels)
        if not self.use_mlp:
            kernel, _ = ConvParams((k, 1, 1), False, self.param_dtype, name="conv")()
            x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
            gates = F.eca_gates(x, kernel.reshape(k), gate=self.gate_layer,
                                precision=self.precision)
        else:
            hidden = self.hidden_for(channels)
            k1, b1 = ConvParams((1, 1, hidden), True, self.param_dtype, name="conv")()
            k2, b2 = ConvParams((k, hidden, 1), True, self.param_dtype, name="conv2")()
            x, k1, b1, k2, b2 = promote_dtype(x, k1, b1, k2, b2, dtype=self.dtype)
            act = activation_function(self.act_layer or nn.relu)
            gates = F.eca_mlp_gates(x, k1.reshape(hidden), b1, k2.reshape(k, hidden), b2,
                                    act=act, gate=self.gate_layer, precision=self.precision)
        self.sow("intermediates", "attention", gates)
        return excite(x, gates.astype(x.dtype))


class CecaModule(_AdaptiveKernel, nn.Module):
    """Circular efficient channel attention (timm's `CecaModule`).

    `EcaModule` whose 1-D convolution `conv` pads with wrapped channels instead of zeros.
    The `[B, C]` float32 gates are sown as ("intermediates", "attention").

    Differences from timm: as `EcaModule`'s (C from the input, float32 gates).

    Attributes:
      channels, kernel_size, gamma, beta, gate_layer: as in `EcaModule`.
      act_layer: as in timm, only gives `conv` a bias when not None; it is never applied.
    """

    channels: int | None = None
    kernel_size: int | None = None
    gamma: float = 2
    beta: float = 1
    act_layer: Activation | None = None
    gate_layer: Activation = "sigmoid"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        check_image("x", x)
        k = self.kernel_size_for(x.shape[-1])
        kernel, bias = ConvParams((k, 1, 1), self.act_layer is not None, self.param_dtype,
                                  name="conv")()
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        gates = F.eca_gates(x, kernel.reshape(k), bias, circular=True, gate=self.gate_layer,
                            precision=self.precision)
        self.sow("intermediates", "attention", gates)
        return excite(x, gates.astype(x.dtype))


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# timm's keys: `conv.weight` `[1, 1, K]` (and `conv.bias` for CECA with an `act_layer`); the MLP
# mode's `conv.{weight,bias}` `[R, 1, 1]`, `[R]` and `conv2.{weight,bias}` `[1, R, K]`, `[1]`.

def _uses_mlp(module: nn.Module) -> bool:
    return isinstance(module, EcaModule) and module.use_mlp


def eca_rules(module: EcaModule | CecaModule) -> Rules:
    if _uses_mlp(module):
        return conv(("conv",), "conv") | conv(("conv2",), "conv2")
    return conv(("conv",), "conv", bias=isinstance(module, CecaModule)
                and module.act_layer is not None)


def _fits(module: EcaModule | CecaModule, channels: int, k: int, hidden: int | None) -> bool:
    try:
        fits = module.kernel_size_for(channels) == k
    except ValueError:
        return False
    return fits and (hidden is None or module.hidden_for(channels) == hidden)


def _eca_inputs(module: EcaModule | CecaModule, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    """An input whose channel count gives the state dict's K (and R): the weights do not
    record C. When none below 2^16 does, C = 1, and `from_torch` reports the misshaped key."""
    mlp = _uses_mlp(module)
    k = shapes["conv2.weight" if mlp else "conv.weight"][-1]
    hidden = shapes["conv.weight"][0] if mlp else None
    channels = next((c for c in range(1, 1 << 16) if _fits(module, c, k, hidden)), 1)
    return (jax.ShapeDtypeStruct((1, 1, 1, channels), jnp.float32),)


register(EcaModule, CecaModule)(Converter(eca_rules, _eca_inputs))
