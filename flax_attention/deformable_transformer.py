"""The whole Deformable DETR transformer: level embeddings, encoder, decoder, reference points.

Zhu, Su, Lu, Li, Wang, Dai: "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021 (arXiv:2010.04159); the form, parameter names and initialisation are
fundamentalvision/Deformable-DETR's `models/deformable_transformer.py` (`DeformableTransformer`,
`DeformableTransformerDecoder`), so `flax_attention.interop.torch.from_torch` loads their state
dicts; the layers and the encoder are `flax_attention.deformable_attention`'s. Legend: B batch,
H_l, W_l a level's height and width, C channels (d_model), Q queries, L levels, S keys (the
levels' pixels, flattened).

Differences from upstream: the feature maps, padding masks and position embeddings are lists of
NHWC arrays (`[B, H_l, W_l, C]`, masks `[B, H_l, W_l]` True = padded as DETR, or None: no
padding); the stacks take upstream's arguments in upstream's order, with `level_start_index`
optional and only checked (`deformable_attention`'s docstring); the call returns `(hs,
init_reference, inter_references)`, without upstream's two trailing two-stage outputs. Not
built: two-stage proposals (`two_stage=True` raises NotImplementedError) and iterative box
refinement (upstream's `decoder.bbox_embed`, set by the detector: the decoder's reference
points stay fixed).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike

from flax_attention import layers
from flax_attention._checks import check_positive, check_rank, check_same
from flax_attention.deformable_attention import (
    _LAYER_FIELDS,
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    _DeformableLayer,
    _layer_rules,
    check_level_start_index,
)
from flax_attention.functional.deformable_attention import SpatialShapes, check_spatial_shapes
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    dense,
    nested,
    param,
    register,
)
from flax_attention.multi_head_attention import XAVIER

__all__ = ["DeformableTransformer", "DeformableTransformerDecoder", "get_valid_ratio"]


def get_valid_ratio(mask: jax.Array) -> jax.Array:
    """The unpadded fraction of a level (Deformable DETR's `get_valid_ratio`): the valid rows
    of its first column over H, the valid columns of its first row over W.

    Args:
      mask: boolean `[B, H, W]`, True = padded (padding at the bottom and right, as DETR's).

    Returns:
      `[B, 2]` (width, height) ratios in float32.
    """
    check_rank("mask", mask, 3, "[B, H, W]")
    _, h, w = mask.shape
    valid = ~jnp.asarray(mask, bool)
    return jnp.stack([valid[:, 0, :].sum(1) / w, valid[:, :, 0].sum(1) / h],
                     -1).astype(jnp.float32)


class DeformableTransformerDecoder(_DeformableLayer):
    """`num_layers` decoder layers (`layers_i`, torch's `layers.i`) around fixed reference
    points (no box refinement), scaled to each level's valid ratio before every layer."""

    num_layers: int = 6
    return_intermediate: bool = False

    @nn.compact
    def __call__(self, tgt: jax.Array, reference_points: jax.Array, src: jax.Array,
                 src_spatial_shapes, src_level_start_index=None,
                 src_valid_ratios: jax.Array | None = None,
                 query_pos: jax.Array | None = None,
                 src_padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """`tgt`, `query_pos` `[B, Q, C]`, `reference_points` `[B, Q, 2 or 4]` in [0, 1] of the
        valid region, `src` `[B, S, C]`, `src_level_start_index` None or `[L]` (checked),
        `src_valid_ratios` `[B, L, 2]` (required), `src_padding_mask` `[B, S]` -> the output
        `[B, Q, C]` and the reference points, each stacked over the layers
        (`[num_layers, B, Q, ...]`) with `return_intermediate`."""
        check_positive("num_layers", self.num_layers)
        check_level_start_index("src_level_start_index", src_level_start_index,
                                "src_spatial_shapes", src_spatial_shapes)
        if src_valid_ratios is None:
            raise TypeError("DeformableTransformerDecoder needs src_valid_ratios [B, L, 2] "
                            "(upstream's order: tgt, reference_points, src, src_spatial_shapes, "
                            "src_level_start_index, src_valid_ratios, ...)")
        if reference_points.ndim != 3 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must have shape [B, Q, 2 or 4], got "
                             f"{tuple(reference_points.shape)}")
        want = (src.shape[0], self.n_levels, 2)
        if src_valid_ratios.shape != want:
            raise ValueError(f"src_valid_ratios must have shape [B, L, 2] = {want}, got "
                             f"{tuple(src_valid_ratios.shape)}")
        ratios = src_valid_ratios if reference_points.shape[-1] == 2 else jnp.concatenate(
            [src_valid_ratios, src_valid_ratios], -1)
        reference_input = reference_points[:, :, None] * ratios[:, None]
        fields = {f: getattr(self, f) for f in _LAYER_FIELDS}
        outputs = []
        for i in range(self.num_layers):
            tgt = DeformableTransformerDecoderLayer(**fields, name=f"layers_{i}")(
                tgt, query_pos, reference_input, src, src_spatial_shapes, src_level_start_index,
                src_padding_mask, deterministic)
            outputs.append(tgt)
        if self.return_intermediate:
            return jnp.stack(outputs), jnp.broadcast_to(reference_points,
                                                        (self.num_layers, *reference_points.shape))
        return tgt, reference_points


class DeformableTransformer(nn.Module):
    """Deformable DETR's transformer (one-stage): the levels flattened with their position
    embeddings plus a learned level embedding (`level_embed` `[L, C]`, normal init), the
    encoder (`encoder`) on the valid ratios of the padding masks, the object queries split into
    position and content halves, initial reference points `sigmoid(reference_points(query_pos))`
    (a Dense C -> 2), and the decoder (`decoder`).

    Attributes (upstream's names):
      d_model: C; divisible by `nhead`.
      nhead: heads of every attention.
      num_encoder_layers, num_decoder_layers: layers of each stack (the encoder's may be 0).
      dim_feedforward: hidden width of the feed-forward blocks.
      return_intermediate_dec: return every decoder layer's output (DETR's auxiliary losses).
      num_feature_levels: L.
      dec_n_points, enc_n_points: sampling points per head and level of each stack.
      two_stage: not built; True raises NotImplementedError.
      implementation: of `ms_deform_attn` ("xla", "pallas" or None).
    """

    d_model: int = 256
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    activation: str = "relu"
    return_intermediate_dec: bool = False
    num_feature_levels: int = 4
    dec_n_points: int = 4
    enc_n_points: int = 4
    two_stage: bool = False
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    def _fields(self, n_points: int) -> dict:
        return dict(d_model=self.d_model, d_ffn=self.dim_feedforward, dropout=self.dropout,
                    activation=self.activation, n_levels=self.num_feature_levels,
                    n_heads=self.nhead, n_points=n_points, implementation=self.implementation,
                    **layers.numerics(self))

    @nn.compact
    def __call__(self, srcs: Sequence[jax.Array], masks: Sequence[jax.Array] | None,
                 pos_embeds: Sequence[jax.Array], query_embed: jax.Array,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Runs encoder and decoder.

        Args:
          srcs: the L feature maps `[B, H_l, W_l, C]`.
          masks: L boolean `[B, H_l, W_l]`, True = padded pixel; None = no padding.
          pos_embeds: L position embeddings `[B, H_l, W_l, C]`.
          query_embed: object queries `[Q, 2C]` (position embedding, then content).
          deterministic: no dropout.

        Returns:
          `hs` `[num_decoder_layers, B, Q, C]` with `return_intermediate_dec`, else the last
          layer's `[B, Q, C]`; the initial reference points `[B, Q, 2]`; the decoder's
          reference points (`[num_decoder_layers, B, Q, 2]` or `[B, Q, 2]`, as `hs`).
        """
        shapes = self._check(srcs, masks, pos_embeds, query_embed)
        b, c = srcs[0].shape[0], self.d_model
        level_embed = self.param("level_embed", nn.initializers.normal(1.0),
                                 (self.num_feature_levels, c), self.param_dtype)

        def flat(x: jax.Array) -> jax.Array:
            return x.reshape(b, -1, *x.shape[3:])

        src = jnp.concatenate([flat(x) for x in srcs], 1)
        pos = jnp.concatenate([flat(p) + level_embed[i].astype(p.dtype)
                               for i, p in enumerate(pos_embeds)], 1)
        if masks is None:
            padding, ratios = None, jnp.ones((b, len(srcs), 2), jnp.float32)
        else:
            padding = jnp.concatenate([flat(m) for m in masks], 1)
            ratios = jnp.stack([get_valid_ratio(m) for m in masks], 1)
        memory = DeformableTransformerEncoder(**self._fields(self.enc_n_points),
                                              num_layers=self.num_encoder_layers,
                                              name="encoder")(
            src, shapes, valid_ratios=ratios, pos=pos, padding_mask=padding,
            deterministic=deterministic)
        query_pos, tgt = (jnp.broadcast_to(x[None], (b, *x.shape))
                          for x in jnp.split(query_embed, 2, axis=1))
        reference_points = nn.sigmoid(nn.Dense(
            2, kernel_init=XAVIER, name="reference_points", **layers.numerics(self))(query_pos))
        hs, references = DeformableTransformerDecoder(
            **self._fields(self.dec_n_points), num_layers=self.num_decoder_layers,
            return_intermediate=self.return_intermediate_dec, name="decoder")(
            tgt, reference_points, memory, shapes, src_valid_ratios=ratios, query_pos=query_pos,
            src_padding_mask=padding, deterministic=deterministic)
        return hs, reference_points, references

    def _check(self, srcs, masks, pos_embeds, query_embed) -> SpatialShapes:
        if self.two_stage:
            raise NotImplementedError("DeformableTransformer: two_stage=True (encoder "
                                      "proposals) is not built; use two_stage=False")
        levels = self.num_feature_levels
        check_positive("num_feature_levels", levels)
        for name, maps in (("srcs", srcs), ("masks", masks), ("pos_embeds", pos_embeds)):
            if maps is not None and len(maps) != levels:
                raise ValueError(f"{name} must hold num_feature_levels = {levels} arrays, got "
                                 f"{len(maps)}")
        for i, (src, pos) in enumerate(zip(srcs, pos_embeds, strict=True)):
            check_rank(f"srcs[{i}]", src, 4, "[B, H, W, C]")
            want = (srcs[0].shape[0], *src.shape[1:3], self.d_model)
            for name, x in ((f"srcs[{i}]", src), (f"pos_embeds[{i}]", pos)):
                if x.shape != want:
                    raise ValueError(f"{name} must have shape [B, H, W, d_model] = {want} "
                                     f"(batch of srcs[0]), got {tuple(x.shape)}")
            if masks is not None and (masks[i].shape != want[:3] or masks[i].dtype != jnp.bool_):
                raise ValueError(f"masks[{i}] must be boolean [B, H, W] = {want[:3]}, got shape "
                                 f"{tuple(masks[i].shape)} dtype {masks[i].dtype}")
        check_rank("query_embed", query_embed, 2, "[Q, 2C]")
        check_same(("query_embed", "2 * d_model"), (query_embed.shape[1], 2 * self.d_model),
                   "channels", (query_embed.shape, (2 * self.d_model,)))
        return check_spatial_shapes([src.shape[1:3] for src in srcs])


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are Deformable DETR's: `level_embed`, `reference_points`, `encoder.layers.i.*`,
# `decoder.layers.i.*` (the layers' keys, `deformable_attention._layer_rules`).


def _stack_rules(module: _DeformableLayer, num_layers: int, decoder: bool) -> Rules:
    rules: Rules = {}
    for i in range(num_layers):
        rules |= nested(_layer_rules(module, decoder), (f"layers_{i}",), f"layers.{i}")
    return rules


def _decoder_inputs(module: DeformableTransformerDecoder, shapes: Shapes) -> tuple:
    """`(tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios)`: one
    query, one pixel a level, of the channels of `layers.0.norm1.bias`."""
    levels, c = module.n_levels, shapes["layers.0.norm1.bias"][0]
    return (jax.ShapeDtypeStruct((1, 1, c), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, 2), jnp.float32),
            jax.ShapeDtypeStruct((1, levels, c), jnp.float32), SpatialShapes(((1, 1),) * levels),
            None, jax.ShapeDtypeStruct((1, levels, 2), jnp.float32))


def _transformer_rules(m: DeformableTransformer) -> Rules:
    rules = param(("level_embed",), "level_embed") | dense(("reference_points",),
                                                          "reference_points")
    for name, count, decoder in (("encoder", m.num_encoder_layers, False),
                                 ("decoder", m.num_decoder_layers, True)):
        rules |= nested(_stack_rules(m, count, decoder), (name,), name)
    return rules


def _transformer_inputs(m: DeformableTransformer, shapes: Shapes) -> tuple:
    """`(srcs, masks, pos_embeds, query_embed)`: one pixel a level and one query, of the
    channels of `level_embed`."""
    c = shapes["level_embed"][1]
    maps = [jax.ShapeDtypeStruct((1, 1, 1, c), jnp.float32)] * m.num_feature_levels
    return maps, None, maps, jax.ShapeDtypeStruct((1, 2 * c), jnp.float32)


register(DeformableTransformerDecoder)(Converter(
    lambda m: _stack_rules(m, m.num_layers, True), _decoder_inputs))
register(DeformableTransformer)(Converter(_transformer_rules, _transformer_inputs))
