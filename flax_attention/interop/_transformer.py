"""transformer: torch -> Flax converters (see torch.py).

Keys are those of `torch.nn.MultiheadAttention` and facebookresearch/detr `models/transformer.py`
and `models/position_encoding.py`; the Flax layer `layers_i` is torch's `layers.i`.
"""

from __future__ import annotations

import jax.numpy as jnp

from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    dense,
    dense_kernel,
    layer_norm,
    nested,
    param,
    register,
)
from flax_attention.position_encoding import PositionEmbeddingLearned
from flax_attention.transformer import (
    MultiHeadAttention,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)


def _sequence(shapes: Shapes, key: str, length: int = 1) -> jnp.ndarray:
    """A `[1, length, C]` zero sequence, C read from the (1-D) torch parameter `key`."""
    return jnp.zeros((1, length, shapes[key][0]))


# --- Multi-head attention ------------------------------------------------------------------------


def _attention_rules() -> Rules:
    return (
        param(("in_proj_kernel",), "in_proj_weight", dense_kernel)
        | param(("in_proj_bias",), "in_proj_bias")
        | dense(("out_proj",), "out_proj")
    )


register(MultiHeadAttention)(
    Converter(lambda m: _attention_rules(), lambda m, s: (_sequence(s, "out_proj.bias"),) * 3)
)


# --- Layers -------------------------------------------------------------------------------------


def _layer_rules(decoder: bool) -> Rules:
    attentions = ("self_attn", "multihead_attn") if decoder else ("self_attn",)
    norms = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    rules = dense(("linear1",), "linear1") | dense(("linear2",), "linear2")
    for name in attentions:
        rules |= nested(_attention_rules(), (name,), name)
    for name in norms:
        rules |= layer_norm((name,), name)
    return rules


def _layer_inputs(prefix: str, decoder: bool):
    """Example inputs of an encoder (`(src,)`) or decoder (`(tgt, memory)`) layer or stack."""

    def example_inputs(_, shapes: Shapes) -> tuple:
        return (_sequence(shapes, f"{prefix}norm1.bias"),) * (2 if decoder else 1)

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


# --- Position embeddings ------------------------------------------------------------------------

register(PositionEmbeddingLearned)(Converter(
    lambda m: param(("row_embed",), "row_embed.weight") | param(("col_embed",), "col_embed.weight"),
    lambda m, s: (jnp.zeros((1, 1, 1, 1)),),
))
