"""DETR's position embeddings of a feature map (facebookresearch/detr models/position_encoding.py).

Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020. DETR takes a
NestedTensor (image features and padding mask); here the feature map `[B, H, W, C]` and the mask
`[B, H, W]` (True = padded) are separate arguments, and the output is `[B, H, W, 2F]` (NHWC).
Legend: B batch, H height, W width, C channels, F features per coordinate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_attention._checks import check_rank
from flax_attention.functional.attention import (
    learned_position_embedding,
    sine_position_embedding,
)
from flax_attention.interop.torch import Converter, param, register

__all__ = ["PositionEmbeddingLearned", "PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """The sine position embedding ("Attention is all you need", generalised to images).

    Channels ordered (pos_y, pos_x), sin/cos interleaved; with `normalize`, positions are the
    cumulative counts of not-padded pixels scaled to [0, scale] (scale 2 pi by default).

    Attributes:
      num_pos_feats: F, channels per coordinate (even); the output has 2F.
      temperature: the wavelength base.
      normalize: normalise positions by the count of not-padded pixels.
      scale: only with `normalize`; None = 2 pi.
    """

    num_pos_feats: int = 64
    temperature: float = 10000.0
    normalize: bool = False
    scale: float | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`x` `[B, H, W, C]` (only its shape is used), `mask` `[B, H, W]` True = padded.

        Returns `[B, H, W, 2F]` in `dtype` (float32 by default); no mask means no padding.
        """
        check_rank("x", x, 4, "[B, H, W, C]")
        if mask is None:
            mask = jnp.zeros(x.shape[:3], dtype=bool)
        elif mask.shape != x.shape[:3]:
            raise ValueError(f"mask must be [B, H, W] = {tuple(x.shape[:3])}, got shape "
                             f"{tuple(mask.shape)}")
        pos = sine_position_embedding(mask, self.num_pos_feats, self.temperature,
                                      self.normalize, self.scale)
        return pos.astype(self.dtype or jnp.float32)


class PositionEmbeddingLearned(nn.Module):
    """The learned absolute position embedding: a row table and a column table of 50 entries.

    Channels ordered (x, y): `col_embed[j]` then `row_embed[i]` at pixel (i, j). Tables start
    uniform in [0, 1), as DETR. Feature maps are limited to 50 x 50.

    Attributes:
      num_pos_feats: F, channels per coordinate; the output has 2F.
    """

    num_pos_feats: int = 256
    num_embeddings: int = 50
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`x` `[B, H, W, C]` (only its shape is used) -> `[B, H, W, 2F]`."""
        check_rank("x", x, 4, "[B, H, W, C]")
        tables = [
            self.param(name, nn.initializers.uniform(scale=1.0),
                       (self.num_embeddings, self.num_pos_feats), self.param_dtype)
            for name in ("row_embed", "col_embed")
        ]
        pos = learned_position_embedding(*tables, *x.shape[:3])
        return pos.astype(self.dtype or self.param_dtype)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys `row_embed.weight`, `col_embed.weight` (detr `models/position_encoding.py`).

register(PositionEmbeddingLearned)(Converter(
    lambda m: param(("row_embed",), "row_embed.weight") | param(("col_embed",), "col_embed.weight"),
    lambda m, s: (jnp.zeros((1, 1, 1, 1)),),
))
