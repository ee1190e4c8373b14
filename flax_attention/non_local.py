"""Non-local blocks in 1-D, 2-D and 3-D, for the four pairwise functions of the paper.

Wang, Girshick, Gupta, He: "Non-local Neural Networks", CVPR 2018; reference code
AlexHex7/Non-local_pytorch (`lib/non_local_{gaussian,embedded_gaussian,dot_product,
concatenation}.py`, one file per pairwise function there, one `mode` field here). Channels last
here, channels first there; parameter names follow the reference so
`flax_attention.interop.torch.from_torch` imports its state dicts.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_choice, check_nonempty, check_rank
from flax_attention.functional.non_local import MODES, non_local, non_local_weights
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    batch_norm,
    conv,
    image_input,
    param,
    register,
)

__all__ = ["NonLocal1D", "NonLocal2D", "NonLocal3D"]

_LAYOUTS = {1: "[B, L, C]", 2: "[B, H, W, C]", 3: "[B, T, H, W, C]"}
# Sub-sampling max-pools every spatial axis by 2, except time in 3-D.
_POOL_WINDOWS = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


class _NonLocalND(nn.Module):
    """The non-local block; `NonLocal1D`, `NonLocal2D` and `NonLocal3D` fix `spatial_dims`.

    With C input channels and inter = `inter_channels` (default max(C // 2, 1)): `g`, `theta` and
    `phi` are 1x1 convolutions C -> inter (mode "gaussian" has no `theta` or `phi`: both are the
    input itself); with `sub_sample`, `g` and `phi` are max-pooled (2, 2x2 or 1x2x2, floor on odd
    sizes as torch's MaxPool); `y = functional.non_local(theta, phi, g, mode)` over the flattened
    positions; `z = W(y) + x`, where `W` is a 1x1 convolution inter -> C followed by a
    BatchNorm whose scale and bias start at zero (`bn_layer`), or a 1x1 convolution that starts
    at zero, so a fresh block is the identity. Mode "concatenate" owns `concat_project`, the
    `[2 inter]` weight of the reference's `Conv(2 inter, 1, 1)`. The `[B, Lq, Lk]` weights are
    sown as ("intermediates", "attention") when that collection is mutable.

    Differences from the reference: an axis of size 1 cannot be sub-sampled and raises
    ValueError (torch fails inside its pool); `use_scale` (mmcv's option, mode "embedded" only)
    divides the logits by sqrt(inter); the reference never scales. The concatenation weights
    are computed without building the reference's `[B, 2 inter, Lq, Lk]` tensor. Ties within a
    pooling window share the gradient (torch gives it to the first maximum).

    Attributes:
      inter_channels: channels of theta, phi and g; None for max(C // 2, 1).
      mode: the pairwise function: "gaussian", "embedded", "dot" or "concatenate".
      sub_sample: max-pool g and phi (4x fewer keys in 2-D and 3-D, 2x in 1-D).
      bn_layer: end W with a zero-initialised BatchNorm (else W's conv starts at zero).
      use_scale: divide embedded-gaussian logits by sqrt(inter).
      chunk_size: modes "gaussian" and "embedded": above this many query positions the
        attention runs in blocks of `chunk_size` queries, in O(positions) memory (the reference
        builds the whole map); None for `functional.non_local`'s default.
      implementation: None, "xla" or "pallas", as in `functional.non_local` (a GPU runs the
        softmax modes by cuDNN or a Pallas flash kernel by default).
      attention_fn: `(q, k, v, *, precision, implementation) -> y`, called on theta, phi and g
        flattened to `[B, L, inter]` with the module's `precision` and `implementation`;
        `functional.non_local` by default (with `mode`, `concat_project`, `use_scale` and
        `chunk_size` bound). Another `attention_fn` computes the whole pairwise function
        itself, so it needs `chunk_size` None, `use_scale` False and a mode other than
        "concatenate" (whose `concat_project` weight it cannot see).
    """

    inter_channels: int | None = None
    mode: str = "embedded"
    sub_sample: bool = True
    bn_layer: bool = True
    use_scale: bool = False
    chunk_size: int | None = None
    implementation: str | None = None
    attention_fn: layers.AttentionFn = non_local
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    spatial_dims: ClassVar[int]

    def _check(self, x: jax.Array) -> int:
        """Checks `x` and the fields; returns the inter channels."""
        check_rank("x", x, self.spatial_dims + 2, _LAYOUTS[self.spatial_dims])
        check_nonempty("x", x, _LAYOUTS[self.spatial_dims])
        check_choice("mode", self.mode, MODES)
        if self.use_scale and self.mode != "embedded":
            raise ValueError(f"use_scale applies to mode 'embedded' only, got mode {self.mode!r}")
        if self.sub_sample:
            window = _POOL_WINDOWS[self.spatial_dims]
            if any(n < k for n, k in zip(x.shape[1:-1], window, strict=True)):
                raise ValueError(
                    f"sub_sample max-pools the spatial axes of x by {window}; every pooled axis "
                    f"needs size >= 2, got x shape {tuple(x.shape)}"
                )
        inter = max(x.shape[-1] // 2, 1) if self.inter_channels is None else self.inter_channels
        if inter < 1:
            raise ValueError(f"inter_channels must be >= 1, got {inter}")
        return inter

    def _conv(self, features: int, name: str, **kwargs) -> layers.PointwiseConv:
        return layers.PointwiseConv(features, self.spatial_dims, name=name, **kwargs,
                                    **layers.numerics(self))

    def _pool(self, x: jax.Array) -> jax.Array:
        return layers.max_pool(x, _POOL_WINDOWS[self.spatial_dims]) if self.sub_sample else x

    def _attention_fn(self, concat_weights: jax.Array | None) -> layers.AttentionFn:
        """`attention_fn` with the mode's arguments bound to the default."""
        fn = layers.bind_attention_fn(self.attention_fn, non_local, chunk_size=self.chunk_size)
        if self.attention_fn is non_local:
            return functools.partial(fn, mode=self.mode, concat_weights=concat_weights,
                                     use_scale=self.use_scale)
        if self.use_scale or self.mode == "concatenate":
            raise ValueError("use_scale and mode 'concatenate' apply to the default "
                             f"attention_fn; got use_scale={self.use_scale}, mode={self.mode!r} "
                             f"with attention_fn={self.attention_fn!r}")
        return fn

    def _project(self, y: jax.Array, channels: int, train: bool) -> jax.Array:
        """W: inter -> C, starting at zero."""
        zeros = nn.initializers.zeros
        if not self.bn_layer:
            return self._conv(channels, "W", kernel_init=zeros, bias_init=zeros)(y)
        y = self._conv(channels, "W_0")(y)
        return layers.batch_norm(train, self.dtype, self.param_dtype, name="W_1",
                                 scale_init=zeros, bias_init=zeros)(y)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """`[B, *S, C]` -> `[B, *S, C]` (S: L in 1-D, H, W in 2-D, T, H, W in 3-D)."""
        inter = self._check(x)
        (x,) = promote_dtype(x, dtype=self.dtype)
        if self.mode == "gaussian":
            theta, phi = x, x
        else:
            theta, phi = self._conv(inter, "theta")(x), self._conv(inter, "phi")(x)
        g, phi = self._pool(self._conv(inter, "g")(x)), self._pool(phi)
        concat_weights = None
        if self.mode == "concatenate":
            init = nn.initializers.normal(1 / math.sqrt(2 * inter))
            concat_weights = self.param("concat_project", init, (2 * inter,), self.param_dtype)
        theta, phi, g = (a.reshape(a.shape[0], -1, a.shape[-1]) for a in (theta, phi, g))
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention", non_local_weights(
                theta, phi, self.mode, concat_weights, self.use_scale, self.precision))
        y = self._attention_fn(concat_weights)(theta, phi, g, precision=self.precision,
                                               implementation=self.implementation)
        y = y.reshape(*x.shape[:-1], inter)
        return x + self._project(y, x.shape[-1], train)


class NonLocal1D(_NonLocalND):
    __doc__ = f"The 1-D non-local block, `[B, L, C]`.\n\n{_NonLocalND.__doc__}"
    spatial_dims: ClassVar[int] = 1


class NonLocal2D(_NonLocalND):
    __doc__ = f"The 2-D non-local block, `[B, H, W, C]`.\n\n{_NonLocalND.__doc__}"
    spatial_dims: ClassVar[int] = 2


class NonLocal3D(_NonLocalND):
    __doc__ = f"The 3-D non-local block, `[B, T, H, W, C]`.\n\n{_NonLocalND.__doc__}"
    spatial_dims: ClassVar[int] = 3


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are AlexHex7/Non-local_pytorch's: `g`, `theta`, `phi` (`g.0`, `phi.0` when sub-sampling
# wraps them with the pool; mode "gaussian" has no `theta` and a parameter-free `phi`), `W.0`
# (conv) and `W.1` (BatchNorm), or `W` (conv) without `bn_layer`, and `concat_project.0` (the
# `Conv2d(2 inter, 1, 1, bias=False)` of mode "concatenate").

NonLocal = NonLocal1D | NonLocal2D | NonLocal3D


def _concat_vector(a: np.ndarray) -> np.ndarray:
    """torch `[1, 2 inter, 1, 1]` -> `[2 inter]` (ValueError for any other layout)."""
    return a.reshape(a.shape[1])


def _g_key(module: NonLocal) -> str:
    return "g.0" if module.sub_sample else "g"


def _rules(module: NonLocal) -> Rules:
    rules = conv(("g",), _g_key(module))
    if module.mode != "gaussian":
        rules |= conv(("theta",), "theta")
        rules |= conv(("phi",), "phi.0" if module.sub_sample else "phi")
    if module.mode == "concatenate":
        rules |= param(("concat_project",), "concat_project.0.weight", _concat_vector)
    if module.bn_layer:
        return rules | conv(("W_0",), "W.0") | batch_norm(("W_1",), "W.1")
    return rules | conv(("W",), "W")


def _inputs(module: NonLocal, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, f"{_g_key(module)}.weight", side=4,
                       spatial_dims=module.spatial_dims)


register(NonLocal1D, NonLocal2D, NonLocal3D)(Converter(_rules, _inputs))
