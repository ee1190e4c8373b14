"""Semantic segmentation networks: DANet and CCNet on a dilated ResNet.

Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (junfu1115/DANet,
`encoding/models/sseg/danet.py`); Huang et al., "CCNet: Criss-Cross Attention for Semantic
Segmentation", ICCV 2019 (speedinghzl/CCNet, `networks/ccnet.py`).

Both run a ResNet backbone at output stride 8 (the strides of `layer3` and `layer4` replaced by
dilations 2 and 4), put their attention head on the `layer4` features `[B, H / 8, W / 8, 2048]`
and upsample its logits bilinearly to the input size with `align_corners=True`, as both
references do (DANet's `up_kwargs`; CCNet upsamples in its loss, `CriterionDSN`).

Differences from the references:
- The backbone is torchvision's ResNet (one 7x7 stem convolution, `models.resnet`), not the
  deep-stem ResNets (three 3x3 stem convolutions) of both repositories; any factory taking the
  `ResNet` fields can be passed as `backbone`.
- CCNet's deep-supervision head (`dsn`, on `layer3`) is left out, and its logits are upsampled
  in the model, not in the loss.
- BatchNorm statistics are per device (the references synchronise them across GPUs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_rank
from flax_attention.criss_cross import RCCAModule
from flax_attention.danet import DANetHead
from flax_attention.functional import interpolate_bilinear
from flax_attention.models.resnet import resnet50, resnet101

__all__ = [
    "CCNet",
    "DANet",
    "ccnet_resnet50",
    "ccnet_resnet101",
    "danet_resnet50",
    "danet_resnet101",
]

# A backbone factory: called with `ResNet`'s fields (features_only, replace_stride_with_dilation,
# dtype, param_dtype, precision, name), applied as `backbone(x, train)`.
BackboneFactory = Callable[..., nn.Module]

_DILATIONS = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}


def _upsample(logits: jax.Array, size: tuple[int, int],
                    precision: lax.PrecisionLike = None) -> jax.Array:
    """Bilinear upsampling with aligned corners (torch's `interpolate(mode="bilinear",
    align_corners=True)`), computed in at least float32.

    Args:
      logits: `[B, H, W, C]`.
      size: `(H', W')`.
      precision: of the interpolation matrix products.

    Returns:
      `[B, H', W', C]` in the dtype of `logits`.
    """
    wide = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return interpolate_bilinear(wide, size, precision).astype(logits.dtype)


class _Segmenter(nn.Module):
    """The dilated backbone and the upsampling that DANet and CCNet share."""

    num_classes: int = 19
    backbone: BackboneFactory = resnet50
    output_stride: int = 8
    dropout: float = 0.1
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _features(self, x: jax.Array, train: bool) -> jax.Array:
        """Checks `x` `[B, H, W, C]`; returns the backbone's last feature map."""
        check_rank("x", x, 4, "[B, H, W, C]")
        if self.output_stride not in _DILATIONS:
            raise ValueError(
                f"output_stride must be one of {tuple(_DILATIONS)}, got {self.output_stride}"
            )
        backbone = self.backbone(
            features_only=True, replace_stride_with_dilation=_DILATIONS[self.output_stride],
            name="backbone", **layers.numerics(self),
        )
        return backbone(x, train)

    def _common(self) -> dict:
        return layers.numerics(self)


class DANet(_Segmenter):
    """DANet (Fu et al., CVPR 2019): a dilated ResNet and the dual-attention head (`DANetHead`:
    position attention and channel attention branches, fused by a sum).

    Returns the fused branch's per-pixel logits `[B, H, W, num_classes]` at the input resolution;
    with `aux` the tuple `(fused, pam, cam)`, each upsampled, as the reference returns them (it
    trains on the sum of the three losses and predicts with the first). Batch statistics are
    used when `train`, dropout (rng stream "dropout") when not `deterministic`. See the module
    docstring for the differences from the reference.

    Attributes:
      num_classes: output channels (19: Cityscapes).
      backbone: the ResNet factory, e.g. `models.resnet50`.
      output_stride: 8 (the paper), 16 or 32: the backbone's total stride.
      dropout: channel dropout rate before the head's classifiers.
      aux: also return the two branches' logits.
    """

    aux: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, deterministic: bool = True
                 ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
        """`[B, H, W, C]` images -> `[B, H, W, num_classes]` logits (or three, with `aux`)."""
        features = self._features(x, train)
        outputs = DANetHead(self.num_classes, self.dropout, name="head", **self._common())(
            features, train, deterministic)
        if not self.aux:
            outputs = outputs[:1]
        upsampled = tuple(_upsample(o, x.shape[1:3], self.precision) for o in outputs)
        return upsampled if self.aux else upsampled[0]


class CCNet(_Segmenter):
    """CCNet (Huang et al., ICCV 2019): a dilated ResNet and the recurrent criss-cross head
    (`RCCAModule`, its criss-cross attention applied `recurrence` times with shared weights).

    Returns per-pixel logits `[B, H, W, num_classes]` at the input resolution. Batch statistics
    are used when `train`, dropout (rng stream "dropout") when not `deterministic`. See the module
    docstring for the differences from the reference (no `dsn` auxiliary head).

    Attributes:
      num_classes: output channels (19: Cityscapes).
      backbone: the ResNet factory, e.g. `models.resnet101` (the paper's).
      output_stride: 8 (the paper), 16 or 32: the backbone's total stride.
      dropout: channel dropout rate before the classifier.
      recurrence: criss-cross passes (2 in the paper: full-image context).
      head_channels: channels of the head's bottleneck (512 in the reference).
    """

    recurrence: int = 2
    head_channels: int = 512

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, deterministic: bool = True
                 ) -> jax.Array:
        """`[B, H, W, C]` images -> `[B, H, W, num_classes]` logits."""
        features = self._features(x, train)
        head = RCCAModule(self.head_channels, self.num_classes, self.recurrence, self.dropout,
                          name="head", **self._common())
        logits = head(features, train, deterministic)
        return _upsample(logits, x.shape[1:3], self.precision)


danet_resnet50 = functools.partial(DANet, backbone=resnet50)
danet_resnet101 = functools.partial(DANet, backbone=resnet101)
ccnet_resnet50 = functools.partial(CCNet, backbone=resnet50)
ccnet_resnet101 = functools.partial(CCNet, backbone=resnet101)
