"""Multi-head attention with DETR's convention (`torch.nn.MultiheadAttention`'s parameters).

Vaswani et al., "Attention Is All You Need", NeurIPS 2017, as `torch.nn.MultiheadAttention` and
facebookresearch/detr use it: one `in_proj` for queries, keys and values, positional embeddings
added to query and key (not value). Sequences are `[B, L, C]` (batch first, where torch uses
`[L, B, C]`). Legend: B batch, C channels, N heads, D head size, L length (T queries, S keys).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import PrecisionLike

from flax_attention import layers
from flax_attention._checks import (
    check_choice,
    check_divisible,
    check_nonempty,
    check_rank,
    check_same,
)
from flax_attention.functional.attention import (
    IMPLEMENTATIONS,
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
)
from flax_attention.interop.torch import (
    Converter,
    Rules,
    Shapes,
    dense,
    dense_kernel,
    param,
    register,
)

__all__ = ["MultiHeadAttention"]

XAVIER = nn.initializers.xavier_uniform()  # DETR: every parameter with dim > 1


def _with_pos(x: jax.Array, pos: jax.Array | None) -> jax.Array:
    return x if pos is None else x + pos


def check_same_shape(name: str, x: jax.Array | None, like_name: str, like: jax.Array) -> None:
    if x is not None:
        check_same((name, like_name), (x.shape, like.shape), "shape", (x.shape, like.shape))


def _check_attention_inputs(num_heads, query, key, value, query_pos, key_pos,
                            key_padding_mask, attn_mask) -> None:
    check_rank("query", query, 3, "[B, T, C]")
    check_rank("key", key, 3, "[B, S, C]")
    check_same_shape("value", value, "key", key)
    check_nonempty("query", query, "[B, T, C]")
    check_nonempty("key", key, "[B, S, C]")
    check_same(("query", "key"), ((query.shape[0], query.shape[2]), (key.shape[0], key.shape[2])),
               "batch and channels ([B, _, C])", (query.shape, key.shape))
    check_divisible("channels", query.shape[-1], num_heads, "num_heads")
    check_same_shape("query_pos", query_pos, "query", query)
    check_same_shape("key_pos", key_pos, "key", key)
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
    transposed), so torch weights import directly. Attention runs through `attention_fn`
    (by default `functional.dot_product_attention`: XLA with a hand-written backward pass, or
    cuDNN fused attention with `implementation="cudnn"`), except when attention dropout is active or
    the "intermediates" collection is mutable: then the weights `[B, N, T, S]` are computed
    explicitly and sown as `intermediates/attention`.

    Masks: `key_padding_mask` keeps torch's meaning (True = padded key, ignored), so DETR code
    ports unchanged. A boolean `attn_mask` follows JAX/Flax instead (True = attend; torch's
    boolean attn_mask is the opposite, pass `~mask`); a float `attn_mask` is added to the logits
    (-inf allowed). Unlike torch, which returns NaN there, a query whose keys are all masked gets
    uniform weights: its output is `out_proj` of the mean of the value projections of all keys.

    Attributes:
      num_heads: N; the channels C must be divisible by it.
      dropout: dropout rate on the attention weights ("dropout" RNG stream).
      implementation: None, "xla" or "cudnn" for the default `attention_fn`; passed to
        `attention_fn`.
      attention_fn: `(q, k, v, *, precision, implementation) -> out` on q `[B, T, N, D]` and
        k, v `[B, S, N, D]`, called with the module's `precision` and `implementation`, and
        with the keywords `mask` (boolean, True = attend) and `bias` (added to the logits),
        both broadcastable to `[B, N, T, S]`, when the call has masks;
        `functional.dot_product_attention` by default.
    """

    num_heads: int
    dropout: float = 0.0
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None
    attention_fn: Callable[..., jax.Array] = dot_product_attention

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
        if self.attention_fn is dot_product_attention:
            check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        channels = query.shape[-1]
        kernel = self.param("in_proj_kernel", XAVIER, (channels, 3 * channels), self.param_dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * channels,), self.param_dtype)
        q, k, v, kernel, bias = promote_dtype(_with_pos(query, query_pos),
                                              _with_pos(key, key_pos), value, kernel, bias,
                                              dtype=self.dtype)
        if query is key and query_pos is key_pos:  # DETR's self-attention: one product for q, k
            q, k = jnp.split(self._heads(q, kernel[:, :2 * channels], bias[:2 * channels]), 2,
                             axis=2)
        else:
            q = self._heads(q, kernel[:, :channels], bias[:channels])
            k = self._heads(k, kernel[:, channels:2 * channels], bias[channels:2 * channels])
        v = self._heads(v, kernel[:, 2 * channels:], bias[2 * channels:])
        out = self._attend(q, k, v, *combine_masks(key_padding_mask, attn_mask), deterministic)
        rows = out.reshape(-1, channels)  # one contracting axis: see `_heads`
        return nn.Dense(channels, kernel_init=XAVIER, name="out_proj",
                        **layers.numerics(self))(rows).reshape(*out.shape[:2], channels)

    def _heads(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """`[B, L, C]` -> projected `[B, L, P * N, D]` for a kernel `[C, P * C]` (P parts).

        The product runs on the `[B * L, C]` rows: with one contracting axis (not B and L) in
        the kernel's gradient, XLA:CPU does not transpose the activations for it.
        """
        rows = x.reshape(-1, x.shape[-1])
        y = jnp.einsum("lc,ce->le", rows, kernel, precision=self.precision) + bias
        return y.reshape(*x.shape[:2], -1, kernel.shape[0] // self.num_heads)

    def _attend(self, q, k, v, mask, bias, deterministic: bool) -> jax.Array:
        """`[B, T, N, D]` queries, `[B, S, N, D]` keys and values -> `[B, T, N, D]`."""
        dropping = not deterministic and self.dropout > 0
        if not (dropping or self.is_mutable_collection("intermediates")):
            masks = {name: a for name, a in (("mask", mask), ("bias", bias)) if a is not None}
            return self.attention_fn(q, k, v, precision=self.precision,
                                     implementation=self.implementation, **masks)
        weights = dot_product_attention_weights(q, k, mask, bias, self.precision)
        self.sow("intermediates", "attention", weights)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        return jnp.einsum("bnts,bsnd->btnd", weights.astype(v.dtype), v,
                          precision=self.precision)


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys of `torch.nn.MultiheadAttention`: `in_proj_weight`, `in_proj_bias`, `out_proj.*`.

def zero_sequence(shapes: Shapes, key: str, length: int = 1) -> jnp.ndarray:
    """A `[1, length, C]` zero sequence, C read from the (1-D) torch parameter `key`."""
    return jnp.zeros((1, length, shapes[key][0]))



def attention_rules() -> Rules:
    return (
        param(("in_proj_kernel",), "in_proj_weight", dense_kernel)
        | param(("in_proj_bias",), "in_proj_bias")
        | dense(("out_proj",), "out_proj")
    )


register(MultiHeadAttention)(
    Converter(lambda m: attention_rules(), lambda m, s: (zero_sequence(s, "out_proj.bias"),) * 3)
)
