"""Multi-head attention and the DETR Transformer.

Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020; the reference is
facebookresearch/detr `models/transformer.py`, built on `torch.nn.MultiheadAttention`.
Sequences are `[B, L, C]` (batch first, where torch uses `[L, B, C]`), feature maps `[B, H, W, C]`.
Legend: B batch, H height, W width, C channels, N heads, L length (T queries, S keys), Q object
queries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import PrecisionLike

from flax_attention._checks import check_choice, check_divisible, check_rank, check_same
from flax_attention.functional.attention import (
    IMPLEMENTATIONS,
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
)

__all__ = [
    "MultiHeadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

_XAVIER = nn.initializers.xavier_uniform()  # DETR: every parameter with dim > 1
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch's F.gelu is the erf form
    "glu": nn.glu,
}


def _torch_linear_bias(fan_in: int) -> Callable:
    """torch.nn.Linear's bias init: uniform in +-1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _with_pos(x: jax.Array, pos: jax.Array | None) -> jax.Array:
    return x if pos is None else x + pos


def _check_same_shape(name: str, x: jax.Array | None, like_name: str, like: jax.Array) -> None:
    if x is not None:
        check_same((name, like_name), (x.shape, like.shape), "shape", (x.shape, like.shape))


def _check_attention_inputs(num_heads, query, key, value, query_pos, key_pos,
                            key_padding_mask, attn_mask) -> None:
    check_rank("query", query, 3, "[B, T, C]")
    check_rank("key", key, 3, "[B, S, C]")
    _check_same_shape("value", value, "key", key)
    check_same(("query", "key"), ((query.shape[0], query.shape[2]), (key.shape[0], key.shape[2])),
               "batch and channels ([B, _, C])", (query.shape, key.shape))
    check_divisible("channels", query.shape[-1], num_heads, "num_heads")
    _check_same_shape("query_pos", query_pos, "query", query)
    _check_same_shape("key_pos", key_pos, "key", key)
    (b, t, _), s = query.shape, key.shape[1]
    if key_padding_mask is not None and (
        key_padding_mask.shape != (b, s) or key_padding_mask.dtype != jnp.bool_
    ):
        raise ValueError(f"key_padding_mask must be boolean [B, S] = {(b, s)}, got shape "
                         f"{tuple(key_padding_mask.shape)} dtype {key_padding_mask.dtype}")
    if attn_mask is not None:
        target = (t, s) if attn_mask.ndim == 2 else (b, num_heads, t, s)
        if attn_mask.ndim not in (2, 4) or any(
            d not in (1, w) for d, w in zip(attn_mask.shape, target, strict=True)
        ):
            raise ValueError(f"attn_mask must be [T, S] = {(t, s)} or broadcast to [B, N, T, S] "
                             f"= {(b, num_heads, t, s)}, got shape {tuple(attn_mask.shape)}")


class MultiHeadAttention(nn.Module):
    """Multi-head attention as DETR calls `torch.nn.MultiheadAttention` (Vaswani et al. 2017).

    Position embeddings are added to the query and the key, never the value. The q/k/v input
    projections are packed as in torch (`in_proj_kernel` `[C, 3C]` is torch's `in_proj_weight`
    transposed), so torch weights import directly. Attention runs through
    `jax.nn.dot_product_attention` (cuDNN fused attention with `implementation="cudnn"`), except
    when attention dropout is active or the "intermediates" collection is mutable: then the
    weights `[B, N, T, S]` are computed explicitly and sown as `intermediates/attention`.

    Masks: `key_padding_mask` keeps torch's meaning (True = padded key, ignored), so DETR code
    ports unchanged. A boolean `attn_mask` follows JAX/Flax instead (True = attend; torch's
    boolean attn_mask is the opposite, pass `~mask`); a float `attn_mask` is added to the logits
    (-inf allowed). Unlike torch, which returns NaN there, a query whose keys are all masked gets
    uniform weights: its output is `out_proj` of the mean of the value projections of all keys.

    Attributes:
      num_heads: N; the channels C must be divisible by it.
      dropout: dropout rate on the attention weights ("dropout" RNG stream).
      implementation: None, "xla" or "cudnn", for `jax.nn.dot_product_attention`.
    """

    num_heads: int
    dropout: float = 0.0
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        query_pos: jax.Array | None = None,
        key_pos: jax.Array | None = None,
        key_padding_mask: jax.Array | None = None,
        attn_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Attends from `query` `[B, T, C]` to `key`/`value` `[B, S, C]`.

        Args:
          query: `[B, T, C]`; `query_pos` (same shape) is added to it.
          key: `[B, S, C]`; `key_pos` (same shape) is added to it.
          value: `[B, S, C]`.
          key_padding_mask: boolean `[B, S]`, True = padded (torch's convention).
          attn_mask: `[T, S]` or broadcastable to `[B, N, T, S]`; boolean True = attend, or
            float added to the logits.
          deterministic: no attention dropout.

        Returns:
          `[B, T, C]`.
        """
        _check_attention_inputs(self.num_heads, query, key, value, query_pos, key_pos,
                                key_padding_mask, attn_mask)
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        channels = query.shape[-1]
        kernel = self.param("in_proj_kernel", _XAVIER, (channels, 3 * channels), self.param_dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * channels,), self.param_dtype)
        inputs = promote_dtype(_with_pos(query, query_pos), _with_pos(key, key_pos), value,
                               kernel, bias, dtype=self.dtype)
        kernels, biases = jnp.split(inputs[3], 3, axis=1), jnp.split(inputs[4], 3)
        q, k, v = map(self._heads, inputs[:3], kernels, biases)
        out = self._attend(q, k, v, *combine_masks(key_padding_mask, attn_mask), deterministic)
        out = out.reshape(*out.shape[:2], channels)
        return nn.Dense(channels, kernel_init=_XAVIER, dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision,
                        name="out_proj")(out)

    def _heads(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """`[B, L, C]` -> projected `[B, L, N, D]`."""
        y = jnp.einsum("blc,ce->ble", x, kernel, precision=self.precision) + bias
        return y.reshape(*y.shape[:2], self.num_heads, -1)

    def _attend(self, q, k, v, mask, bias, deterministic: bool) -> jax.Array:
        """`[B, T, N, D]` queries, `[B, S, N, D]` keys and values -> `[B, T, N, D]`."""
        dropping = not deterministic and self.dropout > 0
        if not (dropping or self.is_mutable_collection("intermediates")):
            return dot_product_attention(q, k, v, mask, bias, self.implementation)
        weights = dot_product_attention_weights(q, k, mask, bias, self.precision)
        self.sow("intermediates", "attention", weights)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        return jnp.einsum("bnts,bsnd->btnd", weights.astype(v.dtype), v,
                          precision=self.precision)


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

    def _layer_fields(self) -> dict:
        """The layer hyper-parameters of this module, to build the layers of a stack."""
        return {name: getattr(self, name) for name in _LAYER_FIELDS}

    def _attention(self, name: str) -> MultiHeadAttention:
        return MultiHeadAttention(self.nhead, self.dropout, self.implementation, self.dtype,
                                  self.param_dtype, self.precision, name=name)

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)

    def _linear(self, features: int, fan_in: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, kernel_init=_XAVIER,
                        bias_init=_torch_linear_bias(fan_in), name=name)

    def _sublayer(self, x: jax.Array, norm: str, fn: Callable, deterministic: bool) -> jax.Array:
        """A residual branch: `x + fn(norm(x))` (pre-norm) or `norm(x + fn(x))` (post-norm)."""
        if self.normalize_before:
            return x + nn.Dropout(self.dropout)(fn(self._norm(norm)(x)), deterministic)
        return self._norm(norm)(x + nn.Dropout(self.dropout)(fn(x), deterministic))

    def _feed_forward(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """linear1 -> activation -> dropout -> linear2, `[B, L, C]` -> `[B, L, C]`."""
        h = _ACTIVATIONS[self.activation](self._linear(self.dim_feedforward, x.shape[-1],
                                                       "linear1")(x))
        h = nn.Dropout(self.dropout)(h, deterministic)
        return self._linear(x.shape[-1], h.shape[-1], "linear2")(h)


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
        check_choice("activation", self.activation, _ACTIVATIONS)
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
        check_choice("activation", self.activation, _ACTIVATIONS)
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
        _check_same_shape("pos_embed", pos_embed, "src", src)
        check_rank("query_embed", query_embed, 2, "[Q, C]")
        check_same(("query_embed", "src"), (query_embed.shape[-1], src.shape[-1]), "channels",
                   (query_embed.shape, src.shape))
        if mask is not None and (mask.shape != src.shape[:3] or mask.dtype != jnp.bool_):
            raise ValueError(f"mask must be boolean [B, H, W] = {tuple(src.shape[:3])}, got "
                             f"shape {tuple(mask.shape)} dtype {mask.dtype}")
