"""The DETR Transformer: encoder and decoder layers and stacks around `MultiHeadAttention`.

Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020; the reference is
facebookresearch/detr `models/transformer.py`, built on `torch.nn.MultiheadAttention`.
Sequences are `[B, L, C]` (batch first, where torch uses `[L, B, C]`), feature maps `[B, H, W, C]`.
Legend: B batch, H height, W width, C channels, N heads, L length (T queries, S keys), Q object
queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike

from flax_attention import layers
from flax_attention._checks import (
    check_choice,
    check_divisible,
    check_nonempty,
    check_positive,
    check_probability,
    check_rank,
    check_same,
)
from flax_attention.functional.activations import ACTIVATIONS
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    dense,
    layer_norm,
    nested,
    register,
)
from flax_attention.layers import torch_linear_bias
from flax_attention.multi_head_attention import (
    XAVIER,
    MultiHeadAttention,
    attention_rules,
    check_same_shape,
    zero_sequence,
)

__all__ = [
    "MultiHeadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

# DETR's `_get_activation_fn` names: two of timm's (gelu the erf form, as torch's) and glu.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": ACTIVATIONS["relu"],
    "gelu": ACTIVATIONS["gelu"],
    "glu": nn.glu,
}


class _LayerBase(nn.Module):
    """The hyper-parameters and sub-blocks shared by DETR's encoder and decoder layers."""

    nhead: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    normalize_before: bool = False
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    def _check_fields(self) -> None:
        """Raises ValueError naming the field for a bad layer setting, before any computation."""
        check_positive("dim_feedforward", self.dim_feedforward)
        check_positive("nhead", self.nhead)
        check_probability("dropout", self.dropout)
        check_choice("activation", self.activation, _ACTIVATIONS)

    def _layer_fields(self) -> dict:
        """The layer hyper-parameters of this module, to build the layers of a stack."""
        return {name: getattr(self, name) for name in _LAYER_FIELDS}

    def _attention(self, name: str) -> MultiHeadAttention:
        return MultiHeadAttention(self.nhead, self.dropout, self.implementation, name=name,
                                  **layers.numerics(self))

    def _norm(self, name: str) -> nn.LayerNorm:
        # Two-pass variance, as torch's LayerNorm (Flax's one-pass loses digits at large means).
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

    def _linear(self, features: int, fan_in: int, name: str) -> nn.Dense:
        return nn.Dense(features, kernel_init=XAVIER, bias_init=torch_linear_bias(fan_in),
                        name=name, **layers.numerics(self))

    def _sublayer(self, x: jax.Array, norm: str, fn: Callable, deterministic: bool) -> jax.Array:
        """A residual branch: `x + fn(norm(x))` (pre-norm) or `norm(x + fn(x))` (post-norm)."""
        if self.normalize_before:
            return x + nn.Dropout(self.dropout)(fn(self._norm(norm)(x)), deterministic)
        return self._norm(norm)(x + nn.Dropout(self.dropout)(fn(x), deterministic))

    def _feed_forward(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """linear1 -> activation -> dropout -> linear2, `[B, L, C]` -> `[B, L, C]`, on the
        `[B * L, C]` rows: with one contracting axis, XLA:CPU computes the weight gradients
        without transposing the `[B * L, dim_feedforward]` activations (1.25x here)."""
        rows = x.reshape(-1, x.shape[-1])
        h = _ACTIVATIONS[self.activation](self._linear(self.dim_feedforward, rows.shape[-1],
                                                       "linear1")(rows))
        h = nn.Dropout(self.dropout)(h, deterministic)
        return self._linear(x.shape[-1], h.shape[-1], "linear2")(h).reshape(x.shape)


_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(_LayerBase)
                      if f.name not in ("parent", "name"))


class TransformerEncoderLayer(_LayerBase):
    """DETR's encoder layer: self-attention (pos added to q, k) and a feed-forward block.

    Post-norm (`normalize_before=False`, DETR's default) or pre-norm. With activation "glu" the
    feed-forward width halves after the activation, so `linear2` takes `dim_feedforward // 2`
    inputs (DETR declares it with `dim_feedforward` and cannot run glu).
    """

    @nn.compact
    def __call__(self, src: jax.Array, pos: jax.Array | None = None,
                 key_padding_mask: jax.Array | None = None, attn_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`src`, `pos` `[B, L, C]`; `key_padding_mask` `[B, L]` True = padded -> `[B, L, C]`."""
        self._check_fields()
        attn = self._attention("self_attn")
        src = self._sublayer(
            src, "norm1",
            lambda x: attn(x, x, x, pos, pos, key_padding_mask, attn_mask, deterministic),
            deterministic)
        return self._sublayer(src, "norm2", lambda x: self._feed_forward(x, deterministic),
                              deterministic)


class TransformerDecoderLayer(_LayerBase):
    """DETR's decoder layer: self-attention, cross-attention to the memory, feed-forward.

    Self-attention adds `query_pos` to q and k; cross-attention takes q = tgt + query_pos,
    k = memory + pos, v = memory. Norms and "glu" as in `TransformerEncoderLayer`.
    """

    @nn.compact
    def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array | None = None,
                 query_pos: jax.Array | None = None,
                 memory_key_padding_mask: jax.Array | None = None,
                 tgt_key_padding_mask: jax.Array | None = None,
                 tgt_mask: jax.Array | None = None, memory_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`tgt`, `query_pos` `[B, Q, C]`; `memory`, `pos` `[B, S, C]` -> `[B, Q, C]`.

        Key padding masks are True where padded: `memory_key_padding_mask` `[B, S]`,
        `tgt_key_padding_mask` `[B, Q]`; attention masks as in `MultiHeadAttention`.
        """
        self._check_fields()
        self_attn, cross_attn = self._attention("self_attn"), self._attention("multihead_attn")
        tgt = self._sublayer(
            tgt, "norm1",
            lambda x: self_attn(x, x, x, query_pos, query_pos, tgt_key_padding_mask, tgt_mask,
                                deterministic),
            deterministic)
        tgt = self._sublayer(
            tgt, "norm2",
            lambda x: cross_attn(x, memory, memory, query_pos, pos, memory_key_padding_mask,
                                 memory_mask, deterministic),
            deterministic)
        return self._sublayer(tgt, "norm3", lambda x: self._feed_forward(x, deterministic),
                              deterministic)


class TransformerEncoder(_LayerBase):
    """`num_layers` encoder layers (`layers_i`), then the LayerNorm `norm` if `final_norm`.

    DETR gives the encoder a final norm only in pre-norm mode.
    """

    num_layers: int = 6
    final_norm: bool = False

    @nn.compact
    def __call__(self, src: jax.Array, pos: jax.Array | None = None,
                 key_padding_mask: jax.Array | None = None, attn_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`src`, `pos` `[B, L, C]`; `key_padding_mask` `[B, L]` True = padded -> `[B, L, C]`."""
        check_positive("num_layers", self.num_layers, minimum=0)
        self._check_fields()
        for i in range(self.num_layers):
            layer = TransformerEncoderLayer(**self._layer_fields(), name=f"layers_{i}")
            src = layer(src, pos, key_padding_mask, attn_mask, deterministic)
        return self._norm("norm")(src) if self.final_norm else src


class TransformerDecoder(_LayerBase):
    """`num_layers` decoder layers (`layers_i`) and the LayerNorm `norm` (always, as DETR).

    Returns the normed output of every layer when `return_intermediate`, else of the last.
    """

    num_layers: int = 6
    return_intermediate: bool = False

    @nn.compact
    def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array | None = None,
                 query_pos: jax.Array | None = None,
                 memory_key_padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`tgt`, `query_pos` `[B, Q, C]`; `memory`, `pos` `[B, S, C]` -> `[L, B, Q, C]`.

        L is `num_layers` with `return_intermediate`, else 1.
        """
        check_positive("num_layers", self.num_layers)
        self._check_fields()
        norm, outputs = self._norm("norm"), []
        for i in range(self.num_layers):
            layer = TransformerDecoderLayer(**self._layer_fields(), name=f"layers_{i}")
            tgt = layer(tgt, memory, pos, query_pos, memory_key_padding_mask,
                        deterministic=deterministic)
            if self.return_intermediate or i == self.num_layers - 1:
                outputs.append(norm(tgt))
        return jnp.stack(outputs)


class Transformer(nn.Module):
    """The DETR Transformer: encoder over the feature map, decoder over the object queries.

    Same defaults as DETR (which builds it with d_model 256 and intermediate outputs). The
    decoder input `tgt` starts at zeros and the query embeddings are its position embedding.

    Attributes:
      d_model: channels C of the feature map (already projected to it).
      nhead: attention heads; d_model must be divisible by it.
      normalize_before: pre-norm layers (and then a final encoder norm, as DETR).
      return_intermediate_dec: return every decoder layer's normed output.
      implementation: None, "xla" or "cudnn" for the attention.
    """

    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    normalize_before: bool = False
    return_intermediate_dec: bool = False
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, src: jax.Array, mask: jax.Array | None, query_embed: jax.Array,
                 pos_embed: jax.Array, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
        """Runs encoder and decoder.

        Args:
          src: feature map `[B, H, W, C]`, C = d_model.
          mask: boolean `[B, H, W]`, True = padded pixel (DETR's convention); None = no padding.
          query_embed: object queries `[Q, C]`.
          pos_embed: position embedding `[B, H, W, C]`.
          deterministic: no dropout.

        Returns:
          decoder outputs `[L, B, Q, C]` (L = num_decoder_layers with return_intermediate_dec,
          else 1) and the memory `[B, H, W, C]`.
        """
        self._check(src, mask, query_embed, pos_embed)
        b, h, w, c = src.shape
        fields = {name: getattr(self, name) for name in _LAYER_FIELDS}
        padding = None if mask is None else mask.reshape(b, h * w)
        pos = pos_embed.reshape(b, h * w, c)
        memory = TransformerEncoder(**fields, num_layers=self.num_encoder_layers,
                                    final_norm=self.normalize_before, name="encoder")(
            src.reshape(b, h * w, c), pos, padding, deterministic=deterministic)
        query_pos = jnp.broadcast_to(query_embed[None], (b, *query_embed.shape))
        hs = TransformerDecoder(**fields, num_layers=self.num_decoder_layers,
                                return_intermediate=self.return_intermediate_dec,
                                name="decoder")(
            jnp.zeros_like(query_pos), memory, pos, query_pos, padding, deterministic)
        return hs, memory.reshape(b, h, w, c)

    def _check(self, src, mask, query_embed, pos_embed) -> None:
        check_rank("src", src, 4, "[B, H, W, C]")
        if src.shape[-1] != self.d_model:
            raise ValueError(f"src must have d_model = {self.d_model} channels, "
                             f"got shape {tuple(src.shape)}")
        check_divisible("d_model", self.d_model, self.nhead, "nhead")
        check_choice("activation", self.activation, _ACTIVATIONS)
        check_positive("num_encoder_layers", self.num_encoder_layers, minimum=0)
        check_positive("num_decoder_layers", self.num_decoder_layers)
        check_positive("dim_feedforward", self.dim_feedforward)
        check_probability("dropout", self.dropout)
        check_same_shape("pos_embed", pos_embed, "src", src)
        check_rank("query_embed", query_embed, 2, "[Q, C]")
        check_nonempty("query_embed", query_embed, "[Q, C]")
        check_same(("query_embed", "src"), (query_embed.shape[-1], src.shape[-1]), "channels",
                   (query_embed.shape, src.shape))
        if mask is not None and (mask.shape != src.shape[:3] or mask.dtype != jnp.bool_):
            raise ValueError(f"mask must be boolean [B, H, W] = {tuple(src.shape[:3])}, got "
                             f"shape {tuple(mask.shape)} dtype {mask.dtype}")


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are those of `torch.nn.MultiheadAttention` and facebookresearch/detr `models/transformer.py`
# and `models/position_encoding.py`; the Flax layer `layers_i` is torch's `layers.i`.



# --- Layers -------------------------------------------------------------------------------------


def _layer_rules(decoder: bool) -> Rules:
    attentions = ("self_attn", "multihead_attn") if decoder else ("self_attn",)
    norms = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    rules = dense(("linear1",), "linear1") | dense(("linear2",), "linear2")
    for name in attentions:
        rules |= nested(attention_rules(), (name,), name)
    for name in norms:
        rules |= layer_norm((name,), name)
    return rules


def _layer_inputs(prefix: str, decoder: bool):
    """Example inputs of an encoder (`(src,)`) or decoder (`(tgt, memory)`) layer or stack."""

    def example_inputs(_, shapes: Shapes) -> tuple:
        return (zero_sequence(shapes, f"{prefix}norm1.bias"),) * (2 if decoder else 1)

    return example_inputs


register(TransformerEncoderLayer)(
    Converter(lambda m: _layer_rules(False), _layer_inputs("", False))
)
register(TransformerDecoderLayer)(
    Converter(lambda m: _layer_rules(True), _layer_inputs("", True))
)


# --- Stacks and the whole Transformer ------------------------------------------------------------


def _stack_rules(num_layers: int, decoder: bool, final_norm: bool) -> Rules:
    rules = layer_norm(("norm",), "norm") if final_norm else {}
    for i in range(num_layers):
        rules |= nested(_layer_rules(decoder), (f"layers_{i}",), f"layers.{i}")
    return rules


register(TransformerEncoder)(Converter(
    lambda m: _stack_rules(m.num_layers, False, m.final_norm), _layer_inputs("layers.0.", False)
))
register(TransformerDecoder)(Converter(
    lambda m: _stack_rules(m.num_layers, True, True), _layer_inputs("layers.0.", True)
))


def _transformer_rules(m: Transformer) -> Rules:
    encoder = _stack_rules(m.num_encoder_layers, False, m.normalize_before)
    decoder = _stack_rules(m.num_decoder_layers, True, True)
    return nested(encoder, ("encoder",), "encoder") | nested(decoder, ("decoder",), "decoder")


def _transformer_inputs(m: Transformer, shapes: Shapes) -> tuple:
    """`(src, mask, query_embed, pos_embed)` with one pixel and one query of d_model channels."""
    src = jnp.zeros((1, 1, 1, m.d_model))
    return src, None, jnp.zeros((1, m.d_model)), src


register(Transformer)(Converter(_transformer_rules, _transformer_inputs))


