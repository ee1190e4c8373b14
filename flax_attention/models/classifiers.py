"""Small digit classifiers: one CNN, and the same CNN with an attention mechanism inserted.

The models the trainer's main job compares (`flax-attention train`): sized so an epoch of the
42 x 42 `distorted-digits` set takes seconds on a 2-core CPU.

- `cnn`: four conv blocks (3x3 conv, BatchNorm, ReLU; stride 2 in the first, a 2x2 max-pool
  after the others) of 16, 32, 64, 64 channels, global average pooling, Dense(128), ReLU,
  dropout, Dense(num_classes).
- `stn-cnn`: a spatial transformer in front (Jaderberg et al. 2015): the tutorial's
  `LocalizationNet` on the input pooled to about 21 px, affine transform, output the input's
  size.
- `<short>-cnn` for every row of the mechanism table (`flax_attention.mechanisms`) placed
  "block": the mechanism's module, built by its row (e.g. `se-cnn`: an SE layer with reduction
  8; `cca-cnn`: criss-cross attention; `nl-cnn`: an embedded-Gaussian non-local block;
  `pam-cnn`: DANet's position attention), after the second conv block.

`create_classifier(name, num_classes, input_shape)` builds these by name and falls back to
`flax_attention.models.registry` for every other name (the ResNets, Attention-56, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import MappingProxyType

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers, mechanisms
from flax_attention._checks import check_choice, check_image, check_positive
from flax_attention.spatial_transformer import LocalizationNet, SpatialTransformer

__all__ = ["AttentionCNN", "create_classifier", "list_classifiers"]

# The mechanisms that go after a conv block: `<short>-cnn` for each.
ATTENTIONS = tuple(m.short for m in mechanisms.MECHANISMS if m.classifier == "block")


class _Localization(nn.Module):
    """The STN tutorial's `LocalizationNet` on the input average-pooled by `factor`; kernels
    (7, 5) from 28 px up, (5, 3) from 16 px, (3, 3) below. `[B, H, W, C]` -> `[B, 32]`."""

    factor: int = 1
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.factor > 1:
            x = nn.avg_pool(x, (self.factor,) * 2, strides=(self.factor,) * 2)
        side = min(x.shape[1:3])
        kernels = (7, 5) if side >= 28 else (5, 3) if side >= 16 else (3, 3)
        return LocalizationNet(kernel_sizes=kernels, name="net", **layers.numerics(self))(x)


class AttentionCNN(nn.Module):
    """A small CNN classifier with an optional spatial transformer and attention block.

    `[B, H, W, C]` -> (STN) -> conv blocks (3x3 conv without bias, BatchNorm, ReLU; the first
    conv has stride 2, the others are followed by a 2x2 max-pool), the attention block after
    block `attention_after` -> global average pooling -> Dense(hidden), ReLU, dropout ->
    Dense(num_classes). Needs H, W >= 2 ** len(features). 42 x 42 inputs give feature maps of
    21, 10, 5 and 2 px.

    Not a reproduction of a paper's network: a common test bed, so the mechanisms are compared
    on the same CNN at the same budget (and fast on a CPU: XLA's CPU convolutions are slow on
    one input channel at full resolution, hence the strided first conv). Average pooling
    rather than flattening: on the distorted digits it learns several times faster. The STN's
    localization net is the PyTorch tutorial's `LocalizationNet` on the input average-pooled
    to about 21 px; its transform starts at the identity.

    Attributes:
      num_classes: outputs.
      features: channels of the conv blocks.
      hidden: width of the hidden dense layer.
      dropout: rate before the last layer (`deterministic=False` needs a "dropout" rng).
      attention: None, or the short name of a mechanism table row placed "block" (`ATTENTIONS`:
        "se", "cca", "nl", "pam", ...), built as its row says.
      attention_after: index of the conv block the attention follows.
      stn: put a spatial transformer (affine) in front.
    """

    num_classes: int = 10
    features: Sequence[int] = (16, 32, 64, 64)
    hidden: int = 128
    dropout: float = 0.1
    attention: str | None = None
    attention_after: int = 1
    stn: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _check(self, x: jax.Array) -> None:
        check_image("x", x)
        for i, features in enumerate(self.features):
            check_positive(f"features[{i}]", features)
        if self.attention is not None:
            check_choice("attention", self.attention, ATTENTIONS)
        if not 0 <= self.attention_after < len(self.features):
            raise ValueError(f"attention_after must lie in [0, {len(self.features)}), "
                             f"got {self.attention_after}")
        side = 2 ** len(self.features)
        if min(x.shape[1:3]) < side:
            raise ValueError(f"x must be at least {side} x {side} for {len(self.features)} "
                             f"downsampling blocks, got shape {tuple(x.shape)}")

    def _common(self, name: str | None = None) -> dict:
        return dict(name=name, **layers.numerics(self))

    def _attention_block(self, x: jax.Array, train: bool) -> jax.Array:
        row = mechanisms.get(self.attention)
        block = row.build(**self._common(row.short))
        return block(x, train) if row.takes_train else block(x)

    def _spatial_transformer(self, x: jax.Array) -> jax.Array:
        localization = _Localization(max(1, min(x.shape[1:3]) // 21), **self._common())
        return SpatialTransformer(localization, **self._common("stn"))(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 deterministic: bool = True) -> jax.Array:
        """`[B, H, W, C]` -> logits `[B, num_classes]` (in `dtype`)."""
        self._check(x)
        if self.stn:
            x = self._spatial_transformer(x)
        for i, features in enumerate(self.features):
            x = layers.ConvBN(features, strides=1 if i else 2, name=f"block{i}",
                              **layers.numerics(self))(x, train)
            x = layers.max_pool(x, (2, 2)) if i else x
            if self.attention is not None and i == self.attention_after:
                x = self._attention_block(x, train)
        dense = functools.partial(nn.Dense, **layers.numerics(self))
        x = nn.relu(dense(self.hidden, name="fc")(x.mean(axis=(1, 2))))
        x = nn.Dropout(self.dropout)(x, deterministic)
        return dense(self.num_classes, name="head")(x)


_CLASSIFIERS: MappingProxyType[str, Callable[..., nn.Module]] = MappingProxyType({
    "cnn": AttentionCNN,
    **{f"{m.short}-cnn": functools.partial(AttentionCNN, stn=True)
       for m in mechanisms.MECHANISMS if m.classifier == "front"},
    **{f"{short}-cnn": functools.partial(AttentionCNN, attention=short) for short in ATTENTIONS},
})


def list_classifiers() -> list[str]:
    """The small classifiers' names (`create_classifier` also takes the registry's)."""
    return list(_CLASSIFIERS)


def create_classifier(name: str, num_classes: int, input_shape: Sequence[int],
                      **overrides) -> nn.Module:
    """Builds the classifier `name` for images of `input_shape`.

    Args:
      name: one of `list_classifiers()`, or a classifier of
        `flax_attention.models.registry.list_models()` (e.g. "se_resnet18").
      num_classes: outputs of the classifier.
      input_shape: `(H, W, C)` of one image; checked against what the small CNNs need.
      **overrides: other fields, e.g. `dtype=jnp.bfloat16`.

    Returns:
      The unbound module; call it as `model.apply(variables, x, train=...)`.

    Raises:
      ValueError: an unknown name (the message lists the known ones), `num_classes` < 1, or a
        `input_shape` that is not (H, W, C) or is too small.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got "
                         f"{tuple(input_shape)}")
    if name not in _CLASSIFIERS:
        from flax_attention.models import registry

        if name not in registry.list_models():
            raise ValueError(f"unknown model {name!r}; known: "
                             f"{', '.join([*_CLASSIFIERS, *registry.list_models()])}")
        return registry.create(name, num_classes=num_classes, **overrides)
    model = _CLASSIFIERS[name](num_classes=num_classes, **overrides)
    side = 2 ** len(model.features)
    if min(input_shape[:2]) < side:
        raise ValueError(f"model {name!r} needs images of at least {side} x {side}, got "
                         f"input_shape {tuple(input_shape)}")
    return model
