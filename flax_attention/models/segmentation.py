"""Semantic segmentation networks: DANet, CCNet and a plain FCN baseline on a dilated ResNet.

Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019 (junfu1115/DANet,
`encoding/models/sseg/danet.py`); Huang et al., "CCNet: Criss-Cross Attention for Semantic
Segmentation", ICCV 2019 (speedinghzl/CCNet, `networks/ccnet.py`).

Both run a ResNet backbone at output stride 8 (the strides of `layer3` and `layer4` replaced by
dilations 2 and 4), put their attention head on the `layer4` features `[B, H / 8, W / 8, 2048]`
and upsample its logits bilinearly to the input size with `align_corners=True`, as both
references do (DANet's `up_kwargs`; CCNet upsamples in its loss, `CriterionDSN`).

The reference repositories' own networks, loadable whole from their checkpoints with
`interop.torch.from_torch` (see the converters at the end of this file):
- `ccnet_deep_resnet101`: speedinghzl/CCNet's `Seg_Model` (networks/ccnet.py): ResNet-101 with
  the deep stem (conv1/bn1, conv2/bn2, conv3/bn3: 3x3 convs to 64, 64, 128), a ceil-mode
  max-pool, every block of layer3 dilated 2 and of layer4 dilated 4, the `head` (`RCCAModule`)
  and the deep-supervision head `dsn` on layer3. Its keys: `conv1.weight`, ..., `layer1.0.*`,
  `head.*`, `dsn.*`.
- `danet_deep_resnet50/101`: junfu1115/DANet's `DANet` (encoding/models/sseg/danet.py) on the
  `encoding` package's ResNet (deep stem `conv1.{0,1,3,4,6}` to 64, 64, 128, then `bn1`;
  dilations as torchvision's). Its keys: `pretrained.conv1.0.weight`, ..., `head.conv5a.0.*`.

Differences from the references:
- `ccnet_resnet*` and `danet_resnet*` use torchvision's ResNet (one 7x7 stem convolution,
  `models.resnet`); any factory taking the `ResNet` fields can be passed as `backbone`.
- CCNet's logits (and the `dsn` ones) are upsampled in the model, not in the loss.
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
from flax_attention._checks import check_image
from flax_attention.criss_cross import RCCAModule, leaky_relu
from flax_attention.danet import DANetHead
from flax_attention.functional import interpolate_bilinear
from flax_attention.interop.torch import (
    Converter,
    Rule,
    Rules,
    Shapes,
    batch_norm,
    conv,
    image_input,
    inplace_abn,
    nested,
    register,
    rules_for,
)
from flax_attention.models.resnet import first_conv_key, resnet50, resnet101

__all__ = [
    "CCNet",
    "DANet",
    "FCN",
    "ccnet_deep_resnet101",
    "ccnet_resnet50",
    "ccnet_resnet101",
    "danet_deep_resnet50",
    "danet_deep_resnet101",
    "danet_resnet50",
    "danet_resnet101",
]

# A backbone factory: called with `ResNet`'s fields (features_only, replace_stride_with_dilation,
# dtype, param_dtype, precision, name), applied as `backbone(x, train)`.
BackboneFactory = Callable[..., nn.Module]

_DILATIONS = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
_DSN_CHANNELS = 512


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

    @nn.nowrap
    def _backbone(self, **kwargs) -> nn.Module:
        """The backbone module (named "backbone"); `kwargs` are more `ResNet` fields."""
        if self.output_stride not in _DILATIONS:
            raise ValueError(
                f"output_stride must be one of {tuple(_DILATIONS)}, got {self.output_stride}"
            )
        return self.backbone(
            features_only=True, replace_stride_with_dilation=_DILATIONS[self.output_stride],
            name="backbone", **kwargs, **layers.numerics(self),
        )

    def _features(self, x: jax.Array, train: bool, **kwargs) -> jax.Array:
        """Checks `x` `[B, H, W, C]`; returns the backbone's last feature map (or those of
        `feature_stages` in `kwargs`)."""
        check_image("x", x)
        return self._backbone(**kwargs)(x, train)

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

    Returns per-pixel logits `[B, H, W, num_classes]` at the input resolution; with `aux` the
    tuple `(logits, dsn_logits)`, both upsampled, as the reference returns `[x, x_dsn]` (before
    upsampling). Batch statistics are used when `train`, dropout (rng stream "dropout") when not
    `deterministic`. See the module docstring for the differences from the reference.

    Attributes:
      num_classes: output channels (19: Cityscapes).
      backbone: the ResNet factory, e.g. `models.resnet101` (the paper's).
      output_stride: 8 (the paper), 16 or 32: the backbone's total stride.
      dropout: channel dropout rate before the classifier.
      recurrence: criss-cross passes (2 in the paper: full-image context).
      head_channels: channels of the head's bottleneck (512 in the reference).
      dsn: build the reference's deep-supervision head `dsn` on layer3 (3x3 conv with bias to
        `dsn_channels`, BatchNorm and leaky ReLU, Dropout2d, 1x1 conv to `num_classes`).
      aux: also return the `dsn` logits (needs `dsn`).
      dsn_channels: of the `dsn` head's 3x3 conv (512 in the reference).
      dsn_stages: with `dsn`, the backbone stages (1 = layer1) that `dsn` and the head read:
        a ResNet's layer3 and layer4 in the reference.
    """

    recurrence: int = 2
    head_channels: int = 512
    dsn: bool = False
    aux: bool = False
    dsn_channels: int = _DSN_CHANNELS
    dsn_stages: tuple[int, int] = (3, 4)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, deterministic: bool = True
                 ) -> jax.Array:
        """`[B, H, W, C]` images -> `[B, H, W, num_classes]` logits (two, with `aux`)."""
        if self.aux and not self.dsn:
            raise ValueError("aux=True returns the dsn logits and needs dsn=True")
        if self.dsn:
            layer3, features = self._features(x, train, feature_stages=self.dsn_stages)
        else:
            features = self._features(x, train)
        head = RCCAModule(self.head_channels, self.num_classes, self.recurrence, self.dropout,
                          name="head", **self._common())
        logits = _upsample(head(features, train, deterministic), x.shape[1:3], self.precision)
        if not self.dsn:
            return logits
        # Computed even without `aux`, so that the parameters exist; jit drops the work.
        dsn = nn.Conv(self.dsn_channels, (3, 3), padding=[(1, 1)] * 2, name="dsn_0",
                      **self._common())(layer3)
        dsn = leaky_relu(layers.batch_norm(train, self.dtype, self.param_dtype,
                                           name="dsn_1")(dsn))
        dsn = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(dsn, deterministic)
        dsn = layers.PointwiseConv(self.num_classes, name="dsn_3", **self._common())(dsn)
        dsn = _upsample(dsn, x.shape[1:3], self.precision)
        return (logits, dsn) if self.aux else logits


class FCN(_Segmenter):
    """The baseline without attention: the dilated backbone and a plain convolutional head, the
    `encoding` package's `FCNHead` (junfu1115/DANet `encoding/models/sseg/fcn.py`): `conv5`, a
    3x3 conv to C / 4 (no bias, DANet's head width), BatchNorm, ReLU, Dropout2d and a 1x1 conv
    (with bias) to `num_classes`.

    Returns per-pixel logits `[B, H, W, num_classes]` at the input resolution. Batch statistics
    are used when `train`, dropout (rng stream "dropout") when not `deterministic`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, deterministic: bool = True
                 ) -> jax.Array:
        """`[B, H, W, C]` images -> `[B, H, W, num_classes]` logits."""
        features = self._features(x, train)
        y = nn.Conv(features.shape[-1] // 4, (3, 3), padding=[(1, 1)] * 2, use_bias=False,
                    name="conv5_0", **self._common())(features)
        y = nn.relu(layers.batch_norm(train, self.dtype, self.param_dtype, name="conv5_1")(y))
        y = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(y, deterministic)
        y = layers.PointwiseConv(self.num_classes, name="conv5_4", **self._common())(y)
        return _upsample(y, x.shape[1:3], self.precision)


danet_resnet50 = functools.partial(DANet, backbone=resnet50)
danet_resnet101 = functools.partial(DANet, backbone=resnet101)
ccnet_resnet50 = functools.partial(CCNet, backbone=resnet50)
ccnet_resnet101 = functools.partial(CCNet, backbone=resnet101)
# The reference repositories' own networks (see the module docstring).
_DEEP_STEM = dict(stem_type="deep", stem_width=64)
ccnet_deep_resnet101 = functools.partial(
    CCNet, dsn=True, backbone=functools.partial(
        resnet101, dilate_first_block=True, ceil_pool=True, **_DEEP_STEM))
danet_deep_resnet50 = functools.partial(
    DANet, backbone=functools.partial(resnet50, **_DEEP_STEM))
danet_deep_resnet101 = functools.partial(
    DANet, backbone=functools.partial(resnet101, **_DEEP_STEM))


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# DANet: the backbone under `pretrained.` (the `encoding` ResNet's names, as torchvision's with
# timm's deep stem `conv1.{0,1,3,4,6}`; no `fc`), the head under `head.` (`DANetHead`'s keys).
# CCNet: the backbone at the top level, its deep stem named `conv1`, `bn1`, `conv2`, `bn2`,
# `conv3`, `bn3` as in CCNet's ResNet; `head.*` (`RCCAModule`), `dsn.{0,1,3}`. Every BatchNorm
# of CCNet is an InPlaceABN(Sync), whose weight is read as the scale `|weight| + eps`.
# FCN: the `encoding` package's FCN, as DANet's backbone under `pretrained.` and its `FCNHead`
# under `head.conv5.{0,1,4}` (conv, BatchNorm, the 1x1 classifier).

# Our deep stem's torch names -> CCNet's.
_CCNET_STEM = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2",
               "conv1.6": "conv3", "bn1": "bn3"}


def _ccnet_stem_name(key: str) -> str:
    module, leaf = key.rsplit(".", 1)
    return f"{_CCNET_STEM.get(module, module)}.{leaf}"


def _danet_rules(module: DANet) -> Rules:
    rules = nested(rules_for(module._backbone()), ("backbone",), "pretrained")
    return rules | nested(rules_for(DANetHead(module.num_classes)), ("head",), "head")


def _ccnet_rules(module: CCNet) -> Rules:
    backbone = module._backbone()
    rules = rules_for(backbone)
    if backbone.stem_type:
        rules = {path: Rule(_ccnet_stem_name(r.key), r.transform) for path, r in rules.items()}
    rules = nested(rules, ("backbone",), "")
    head = RCCAModule(module.head_channels, module.num_classes)
    rules |= nested(rules_for(head), ("head",), "head")
    if module.dsn:
        rules |= conv(("dsn_0",), "dsn.0") | batch_norm(("dsn_1",), "dsn.1")
        rules |= conv(("dsn_3",), "dsn.3")
    return inplace_abn(rules)


def _fcn_rules(module: FCN) -> Rules:
    rules = nested(rules_for(module._backbone()), ("backbone",), "pretrained")
    rules |= conv(("conv5_0",), "head.conv5.0", bias=False)
    return rules | batch_norm(("conv5_1",), "head.conv5.1") | conv(("conv5_4",), "head.conv5.4")


def _danet_inputs(module: DANet | FCN, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, "pretrained." + first_conv_key(module._backbone()), side=32)


def _ccnet_inputs(module: CCNet, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    return image_input(shapes, _ccnet_stem_name(first_conv_key(module._backbone())), side=32)


register(DANet)(Converter(_danet_rules, _danet_inputs))
register(CCNet)(Converter(_ccnet_rules, _ccnet_inputs))
register(FCN)(Converter(_fcn_rules, _danet_inputs))
