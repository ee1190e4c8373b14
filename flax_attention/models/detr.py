"""DETR, the detection transformer (Carion et al., "End-to-End Object Detection with
Transformers", ECCV 2020; facebookresearch/detr `models/detr.py`, `models/backbone.py`).

A ResNet backbone (last feature map, stride 32), `input_proj` (1x1 conv to `hidden_dim`), the
sine position embedding of the feature map (normalised), the encoder-decoder `Transformer` over
`num_queries` learned object queries, and per decoder layer `class_embed` (K + 1 logits, the last
"no object") and `bbox_embed` (a 3-layer MLP, then a sigmoid: normalised `(cx, cy, w, h)`).
Train it with `flax_attention.detr_criterion.set_criterion`.

Legend: B batch, H height, W width, C channels, Q object queries, K object classes.

Differences from the reference:
- Images and the padding mask are separate arguments instead of a `NestedTensor`; NHWC.
- The backbone's BatchNorm always uses its running statistics (DETR's `FrozenBatchNorm2d`), but
  its scale and bias are ordinary parameters: to freeze them as DETR does, leave them out of the
  optimizer (e.g. `optax.masked`). They are counted among the parameters (53,120 for ResNet-50),
  so DETR-R50 has 41.58M here against the paper's 41.3M.
- Initialisation: as DETR's outside the backbone (the Transformer's xavier; `input_proj`,
  `class_embed` and `bbox_embed` torch's defaults, U(+-1 / sqrt(fan_in)); `query_embed`
  N(0, 1)); the backbone's is Flax's default (DETR starts from a pretrained one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from flax_attention import layers
from flax_attention._checks import check_image, check_rank
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    conv,
    dense,
    image_input,
    nested,
    param,
    register,
    rules_for,
)
from flax_attention.models.resnet import first_conv_key, resnet50
from flax_attention.position_encoding import PositionEmbeddingSine
from flax_attention.transformer import Transformer

__all__ = ["DETR", "MLP", "detr_resnet50", "downsample_mask"]

# A backbone factory: called with `ResNet`'s fields (features_only, dtype, param_dtype,
# precision, name), applied as `backbone(x, train)`.
BackboneFactory = Callable[..., nn.Module]


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """torch's "nearest" source index of each output index: floor(i * in / out) in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


def downsample_mask(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """A padding mask at a feature map's size, as DETR's backbone computes it
    (`interpolate(mask.float(), size).bool()`: torch's "nearest" mode).

    Args:
      mask: boolean `[B, H, W]`, True where padded.
      size: `(H', W')`, the feature map's spatial size.

    Returns:
      boolean `[B, H', W']`: output pixel (i, j) is input pixel
      `(floor(i * H / H'), floor(j * W / W'))`.
    """
    check_rank("mask", mask, 3, "[B, H, W]")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be two positive ints (H', W'), got {tuple(size)}")
    rows = _nearest_indices(mask.shape[1], size[0])
    cols = _nearest_indices(mask.shape[2], size[1])
    return mask[:, rows][:, :, cols]


def _torch_dense(features: int, fan_in: int, **kwargs) -> nn.Dense:
    """An `nn.Dense` initialised as torch's `nn.Linear` (DETR's heads keep torch's defaults)."""
    return nn.Dense(features, kernel_init=layers.TORCH_KERNEL,
                    bias_init=layers.torch_linear_bias(fan_in), **kwargs)


class MLP(nn.Module):
    """DETR's MLP: `num_layers` Dense layers (`layers_0`, ...; torch's `layers.N`), ReLU
    between them; initialised as torch's `nn.Linear` (`layers.TORCH_KERNEL`, U(+-1 / sqrt(fan_in))
    biases).

    Attributes:
      hidden_dim: features of every layer but the last.
      output_dim: features of the last layer.
      num_layers: number of Dense layers.
    """

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., C]` -> `[..., output_dim]`."""
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = _torch_dense(self.output_dim if last else self.hidden_dim, x.shape[-1],
                             name=f"layers_{i}", **layers.numerics(self))(x)
            x = x if last else nn.relu(x)
        return x


class DETR(nn.Module):
    """DETR (Carion et al., ECCV 2020): backbone, Transformer, class and box heads.

    Submodule names follow the reference (`backbone`, `input_proj`, `query_embed`, `transformer`,
    `class_embed`, `bbox_embed`). See the module docstring for the differences.

    Attributes:
      num_classes: K; the logits have K + 1 entries (91 with COCO's ids, as DETR).
      num_queries: Q, the object queries (the most objects one image can hold).
      backbone: the ResNet factory (features only, stride 32), e.g. `models.resnet50`.
      hidden_dim: the Transformer's width (even: half of it per sine coordinate).
      nheads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, pre_norm: of
        the `Transformer` (DETR's defaults: 8, 6, 6, 2048, 0.1, post-norm).
      aux_loss: also return every earlier decoder layer's predictions as "aux_outputs".
      implementation: of the attention, as in `MultiHeadAttention`.
    """

    num_classes: int = 91
    num_queries: int = 100
    backbone: BackboneFactory = resnet50
    hidden_dim: int = 256
    nheads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    aux_loss: bool = True
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: lax.PrecisionLike = None

    def _check(self, images: jax.Array, mask: jax.Array | None) -> None:
        check_image("images", images)
        if mask is not None and (mask.shape != images.shape[:3] or mask.dtype != jnp.bool_):
            raise ValueError(f"mask must be boolean [B, H, W] = {tuple(images.shape[:3])} (the "
                             f"images' [B, H, W]), got shape {tuple(mask.shape)} dtype "
                             f"{mask.dtype}")
        if self.hidden_dim < 2 or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim must be a positive even number, got {self.hidden_dim}")
        if self.num_queries < 1 or self.num_decoder_layers < 1:
            raise ValueError(f"num_queries ({self.num_queries}) and num_decoder_layers "
                             f"({self.num_decoder_layers}) must be >= 1")

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array | None = None,
                 deterministic: bool = True) -> dict:
        """Detects objects.

        Args:
          images: `[B, H, W, C]` (normalised RGB, C = 3, for the ResNet backbones).
          mask: boolean `[B, H, W]`, True on padding pixels; None: no padding.
          deterministic: no dropout (rng stream "dropout" otherwise).

        Returns:
          `{"pred_logits": [B, Q, K + 1], "pred_boxes": [B, Q, 4]}` of the last decoder layer,
          boxes normalised `(cx, cy, w, h)` in (0, 1), and with `aux_loss` "aux_outputs": a list
          of `num_decoder_layers - 1` such dicts, from the first decoder layer on.
        """
        self._check(images, mask)
        common = layers.numerics(self)
        features = self.backbone(features_only=True, name="backbone", **common)(images, False)
        if mask is not None:
            mask = downsample_mask(mask, features.shape[1:3])
        src = layers.PointwiseConv(self.hidden_dim, kernel_init=layers.TORCH_KERNEL,
                                   bias_init=layers.torch_linear_bias(features.shape[-1]),
                                   name="input_proj", **common)(features)
        pos = PositionEmbeddingSine(self.hidden_dim // 2, normalize=True, dtype=self.dtype)(
            src, mask)
        query_embed = self.param("query_embed", nn.initializers.normal(1.0),
                                 (self.num_queries, self.hidden_dim), self.param_dtype)
        (query_embed,) = promote_dtype(query_embed, dtype=self.dtype)
        transformer = _transformer(self, name="transformer")
        hs, _ = transformer(src, mask, query_embed, pos, deterministic)
        logits = _torch_dense(self.num_classes + 1, hs.shape[-1], name="class_embed",
                              **common)(hs)
        boxes = nn.sigmoid(MLP(self.hidden_dim, 4, 3, name="bbox_embed", **common)(hs))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1], strict=True)]
        return out


def _transformer(m: DETR, **kwargs) -> Transformer:
    """The DETR's Transformer (`kwargs`: its name inside the DETR)."""
    return Transformer(
        d_model=m.hidden_dim, nhead=m.nheads, num_encoder_layers=m.num_encoder_layers,
        num_decoder_layers=m.num_decoder_layers, dim_feedforward=m.dim_feedforward,
        dropout=m.dropout, normalize_before=m.pre_norm, return_intermediate_dec=True,
        implementation=m.implementation, **layers.numerics(m), **kwargs,
    )


detr_resnet50 = functools.partial(DETR, backbone=resnet50)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are facebookresearch/detr's whole `DETR` state_dict: `backbone.0.body.*` (torchvision's
# ResNet with FrozenBatchNorm2d, up to layer4), `transformer.*`, `input_proj`, `query_embed.weight`,
# `class_embed`, `bbox_embed.layers.{0,1,2}`. The sine position embedding (`backbone.1`) has none.

_BACKBONE_PREFIX = "backbone.0.body"


def _detr_backbone(m: DETR) -> nn.Module:
    return m.backbone(features_only=True)


def _detr_rules(m: DETR) -> Rules:
    rules = nested(rules_for(_detr_backbone(m)), ("backbone",), _BACKBONE_PREFIX)
    rules |= nested(rules_for(_transformer(m)), ("transformer",), "transformer")
    rules |= conv(("input_proj",), "input_proj") | param(("query_embed",), "query_embed.weight")
    rules |= dense(("class_embed",), "class_embed")
    for i in range(3):
        rules |= dense(("bbox_embed", f"layers_{i}"), f"bbox_embed.layers.{i}")
    return rules


def _detr_inputs(m: DETR, shapes: Shapes) -> tuple[jax.ShapeDtypeStruct]:
    """An image of 32 x 32 pixels (one feature pixel) with the backbone's input channels."""
    key = f"{_BACKBONE_PREFIX}.{first_conv_key(_detr_backbone(m))}"
    return image_input(shapes, key, side=32)


register(DETR)(Converter(_detr_rules, _detr_inputs))
