"""Multi-scale deformable attention and the deformable transformer's encoder and decoder layers.

Zhu, Su, Lu, Li, Wang, Dai: "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021 (arXiv:2010.04159); the form, parameter names and initialisation are
fundamentalvision/Deformable-DETR's (`models/ops/modules/ms_deform_attn.py`,
`models/deformable_transformer.py`), so `flax_attention.interop.torch.from_torch` loads their
state dicts. Sequences are `[B, L, C]` (batch first, as upstream); padding masks are True where
padded (torch's convention). Legend: B batch, Q queries, S keys (the L levels' pixels,
flattened), C channels (d_model), N heads, L levels, P points.

The calls take upstream's arguments in upstream's order, `level_start_index` included.
Differences from upstream: `spatial_shapes` is static (a sequence of (H_l, W_l) pairs, or a
`functional.deformable_attention.SpatialShapes` to pass through `jax.jit` as an argument);
`level_start_index` is optional and derived from it: when given, it is checked against
`spatial_shapes` (its values when concrete; only its shape `[L]` when traced, under `jax.jit`)
and otherwise unused. The softmax runs in float32. The whole
`DeformableTransformer` (level embeddings, reference points, the decoder stack) is
`flax_attention.deformable_transformer`'s.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import PrecisionLike

from flax_attention import layers
from flax_attention._checks import (
    check_choice,
    check_divisible,
    check_positive,
    check_probability,
    check_rank,
)
from flax_attention.functional.deformable_attention import (
    SpatialShapes,
    check_spatial_shapes,
    get_reference_points,
    ms_deform_attn,
)
from flax_attention.functional.deformable_attention import level_start_index as level_starts
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
)
from flax_attention.transformer import _ACTIVATIONS

__all__ = ["DeformableTransformerDecoderLayer", "DeformableTransformerEncoder",
           "DeformableTransformerEncoderLayer", "MSDeformAttn", "radial_offsets"]


def check_level_start_index(name: str, level_start_index, shapes_name: str,
                            spatial_shapes) -> SpatialShapes:
    """`spatial_shapes` as `SpatialShapes`, after checking upstream's `level_start_index`
    against it: None, or an array or sequence `[L]` = `[0, H_0 * W_0, ...]` (each level's start
    in the flattened keys), its values when concrete, only its shape when traced (`jax.jit`).
    `name` and `shapes_name` are the caller's argument names; a ValueError names both."""
    shapes = check_spatial_shapes(spatial_shapes)
    if level_start_index is None:
        return shapes
    expected = list(level_starts(shapes))
    traced = isinstance(level_start_index, jax.core.Tracer)
    given = level_start_index if traced else np.asarray(level_start_index)
    if given.shape != (len(expected),):
        raise ValueError(f"{name} must have shape [L] = ({len(expected)},) for {shapes_name} "
                         f"{tuple(shapes)} (values {expected}), got shape {tuple(given.shape)} "
                         f"dtype {given.dtype}")
    if not traced and not np.array_equal(given, expected):
        raise ValueError(f"{name} must be {expected}, the levels' starts for {shapes_name} "
                         f"{tuple(shapes)}, got {given.tolist()}")
    return shapes


def radial_offsets(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
    """Deformable DETR's initial `sampling_offsets.bias` `[N * L * P * 2]`: head h's points
    lie on the ray of angle 2 pi h / N, scaled so the larger of |x|, |y| is 1, point p at
    p + 1 times that, the same on every level; laid out (heads, levels, points, (x, y))."""
    thetas = np.arange(n_heads, dtype=np.float32) * np.float32(2.0 * math.pi / n_heads)
    ray = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    ray = ray / np.abs(ray).max(-1, keepdims=True)
    scale = np.arange(1, n_points + 1, dtype=np.float32)[:, None]
    return np.broadcast_to(ray[:, None, None] * scale,
                           (n_heads, n_levels, n_points, 2)).reshape(-1).astype(np.float32)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR's `MSDeformAttn`).

    Each query predicts, per head, P sampling offsets on each of L levels (`sampling_offsets`)
    and their weights (`attention_weights`, a softmax over the L * P points), around its
    reference point; the values (`value_proj` of `input_flatten`, zero where padded) are read
    there bilinearly (`functional.ms_deform_attn`) and the heads go through `output_proj`.
    Offsets are in pixels of each level for 2-d reference points, in fractions of the box for
    4-d reference boxes (cx, cy, w, h): loc = ref[:2] + offset / P * ref[2:] / 2.

    The sampling locations are sown as ("intermediates", "attention") `[B, Q, N * L * P, 2]`
    (x, y in [0, 1] of the image, float32; the "points" picture) and their weights as
    ("intermediates", "sampling_weights") `[B, Q, N * L * P]` (float32; each head's L * P
    sum to 1), in the same order (heads, levels, points).

    Attributes:
      d_model: C, the channels of queries and inputs; divisible by `n_heads`.
      n_levels: L.
      n_heads: N.
      n_points: P, sampling points per head and level.
      implementation: of `ms_deform_attn` ("xla", "pallas" or None).
    """

    d_model: int = 256
    n_levels: int = 4
    n_heads: int = 8
    n_points: int = 4
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    def _dense(self, features: int, name: str, kernel_init=XAVIER,
               bias_init=nn.initializers.zeros) -> nn.Dense:
        return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, name=name,
                        **layers.numerics(self))

    def _check(self, query, reference_points, input_flatten, spatial_shapes,
               input_level_start_index, input_padding_mask) -> SpatialShapes:
        for name in ("d_model", "n_levels", "n_heads", "n_points"):
            check_positive(name, getattr(self, name))
        check_divisible("d_model", self.d_model, self.n_heads, "n_heads")
        check_rank("query", query, 3, "[B, Q, C]")
        check_rank("input_flatten", input_flatten, 3, "[B, S, C]")
        b, q, _ = query.shape
        for name, x, want in (("query", query, (b, q, self.d_model)),
                              ("input_flatten", input_flatten, (b, input_flatten.shape[1],
                                                                self.d_model))):
            if x.shape != want:
                raise ValueError(f"{name} must have shape {want} (batch {b}, d_model "
                                 f"{self.d_model}), got {tuple(x.shape)}")
        if reference_points.shape not in ((b, q, self.n_levels, 2), (b, q, self.n_levels, 4)):
            raise ValueError(f"reference_points must have shape [B, Q, L, 2] or [B, Q, L, 4] = "
                             f"{(b, q, self.n_levels)} + (2 or 4,), got "
                             f"{tuple(reference_points.shape)}")
        shapes = check_level_start_index("input_level_start_index", input_level_start_index,
                                         "spatial_shapes", spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"spatial_shapes must have n_levels = {self.n_levels} pairs, got "
                             f"{shapes}")
        if input_padding_mask is not None and (input_padding_mask.shape != input_flatten.shape[:2]
                                               or input_padding_mask.dtype != jnp.bool_):
            raise ValueError(f"input_padding_mask must be boolean [B, S] = "
                             f"{tuple(input_flatten.shape[:2])}, got shape "
                             f"{tuple(input_padding_mask.shape)} dtype {input_padding_mask.dtype}")
        return shapes

    @nn.compact
    def __call__(self, query: jax.Array, reference_points: jax.Array,
                 input_flatten: jax.Array, spatial_shapes, input_level_start_index=None,
                 input_padding_mask: jax.Array | None = None) -> jax.Array:
        """`query` `[B, Q, C]`, `reference_points` `[B, Q, L, 2 or 4]` in [0, 1],
        `input_flatten` `[B, S, C]`, `spatial_shapes` the L levels' (H_l, W_l) (static, summing
        to S), `input_level_start_index` None or `[L]` (upstream's; checked, module docstring),
        `input_padding_mask` boolean `[B, S]` True = padded -> `[B, Q, C]`."""
        shapes = self._check(query, reference_points, input_flatten, spatial_shapes,
                             input_level_start_index, input_padding_mask)
        (b, q, _), s = query.shape, input_flatten.shape[1]
        n, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self._dense(self.d_model, "value_proj")(input_flatten)
        if input_padding_mask is not None:
            value = jnp.where(input_padding_mask[..., None], 0, value)
        value = value.reshape(b, s, n, self.d_model // n)
        offsets = self._dense(
            n * levels * points * 2, "sampling_offsets", nn.initializers.zeros,
            lambda *_: jnp.asarray(radial_offsets(n, levels, points), self.param_dtype),
        )(query).reshape(b, q, n, levels, points, 2).astype(jnp.float32)
        logits = self._dense(n * levels * points, "attention_weights", nn.initializers.zeros)(
            query).reshape(b, q, n, levels * points)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(
            b, q, n, levels, points)
        reference = reference_points.astype(jnp.float32)[:, :, None, :, None]
        if reference_points.shape[-1] == 2:
            normalizer = np.asarray([(w, h) for h, w in shapes], np.float32)[:, None]
            locations = reference + offsets / normalizer
        else:
            locations = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
        self.sow("intermediates", "attention", locations.reshape(b, q, n * levels * points, 2))
        self.sow("intermediates", "sampling_weights", weights.reshape(b, q, n * levels * points))
        out = ms_deform_attn(value, shapes, locations, weights,
                             implementation=self.implementation)
        return self._dense(self.d_model, "output_proj")(out)


class _DeformableLayer(nn.Module):
    """The fields and sub-blocks shared by the encoder and decoder layers."""

    d_model: int = 256
    d_ffn: int = 1024
    dropout: float = 0.1
    activation: str = "relu"
    n_levels: int = 4
    n_heads: int = 8
    n_points: int = 4
    implementation: str | None = None
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    def _check_fields(self) -> None:
        check_positive("d_ffn", self.d_ffn)
        check_probability("dropout", self.dropout)
        check_choice("activation", self.activation, ("relu", "gelu"))

    def _deformable(self, name: str) -> MSDeformAttn:
        return MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points,
                            self.implementation, name=name, **layers.numerics(self))

    def _residual(self, x: jax.Array, branch: jax.Array, norm: str,
                  deterministic: bool) -> jax.Array:
        """`norm(x + dropout(branch))` (post-norm, as upstream)."""
        branch = nn.Dropout(self.dropout)(branch, deterministic)
        # Two-pass variance, as torch's LayerNorm: the one-pass E[x^2] - E[x]^2 cancels
        # catastrophically on activations with a large mean.
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                            use_fast_variance=False, name=norm)(x + branch)

    def _ffn(self, x: jax.Array, norm: str, deterministic: bool) -> jax.Array:
        """linear1 -> activation -> dropout -> linear2, then the residual and `norm`."""
        linear = [nn.Dense(f, kernel_init=XAVIER, bias_init=torch_linear_bias(i), name=name,
                           **layers.numerics(self))
                  for f, i, name in ((self.d_ffn, self.d_model, "linear1"),
                                     (self.d_model, self.d_ffn, "linear2"))]
        h = nn.Dropout(self.dropout)(_ACTIVATIONS[self.activation](linear[0](x)), deterministic)
        return self._residual(x, linear[1](h), norm, deterministic)


def _with_pos(x: jax.Array, pos: jax.Array | None) -> jax.Array:
    return x if pos is None else x + pos


class DeformableTransformerEncoderLayer(_DeformableLayer):
    """Deformable DETR's encoder layer: deformable self-attention (`self_attn`; queries are
    src + pos, values src), then the feed-forward block (`linear1`, `linear2`), each followed
    by a residual and a LayerNorm (`norm1`, `norm2`)."""

    @nn.compact
    def __call__(self, src: jax.Array, pos: jax.Array | None, reference_points: jax.Array,
                 spatial_shapes, level_start_index=None,
                 padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`src`, `pos` `[B, S, C]`, `reference_points` `[B, S, L, 2]`, `level_start_index`
        None or `[L]` (checked), `padding_mask` `[B, S]` (True = padded) -> `[B, S, C]`."""
        self._check_fields()
        check_level_start_index("level_start_index", level_start_index, "spatial_shapes",
                                spatial_shapes)
        src2 = self._deformable("self_attn")(_with_pos(src, pos), reference_points, src,
                                             spatial_shapes, level_start_index, padding_mask)
        src = self._residual(src, src2, "norm1", deterministic)
        return self._ffn(src, "norm2", deterministic)


class DeformableTransformerEncoder(_DeformableLayer):
    """`num_layers` encoder layers (`layers_i`, torch's `layers.i`) on the encoder's reference
    points (`functional.get_reference_points`: every pixel centre of every level)."""

    num_layers: int = 6

    @nn.compact
    def __call__(self, src: jax.Array, spatial_shapes, level_start_index=None,
                 valid_ratios: jax.Array | None = None, pos: jax.Array | None = None,
                 padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`src`, `pos` `[B, S, C]`, `level_start_index` None or `[L]` (checked),
        `valid_ratios` `[B, L, 2]` (required: the unpadded (width, height) fraction of each
        level), `padding_mask` `[B, S]` -> `[B, S, C]`."""
        check_positive("num_layers", self.num_layers, minimum=0)
        check_level_start_index("level_start_index", level_start_index, "spatial_shapes",
                                spatial_shapes)
        if valid_ratios is None:
            raise TypeError("DeformableTransformerEncoder needs valid_ratios [B, L, 2] (upstream's "
                            "order: src, spatial_shapes, level_start_index, valid_ratios, ...)")
        reference_points = get_reference_points(spatial_shapes, valid_ratios)
        fields = {f: getattr(self, f) for f in _LAYER_FIELDS}
        for i in range(self.num_layers):
            src = DeformableTransformerEncoderLayer(**fields, name=f"layers_{i}")(
                src, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                deterministic)
        return src


class DeformableTransformerDecoderLayer(_DeformableLayer):
    """Deformable DETR's decoder layer: multi-head self-attention of the queries
    (`self_attn`, torch's `nn.MultiheadAttention`; q = k = tgt + query_pos), deformable
    cross-attention to the encoder output (`cross_attn`), the feed-forward block; residuals
    with LayerNorms `norm2`, `norm1`, `norm3` in that order (upstream's names)."""

    @nn.compact
    def __call__(self, tgt: jax.Array, query_pos: jax.Array | None,
                 reference_points: jax.Array, src: jax.Array, src_spatial_shapes,
                 level_start_index=None, src_padding_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """`tgt`, `query_pos` `[B, Q, C]`, `reference_points` `[B, Q, L, 2 or 4]`, `src`
        `[B, S, C]`, `level_start_index` None or `[L]` (checked), `src_padding_mask` `[B, S]`
        (True = padded) -> `[B, Q, C]`."""
        self._check_fields()
        check_level_start_index("level_start_index", level_start_index, "src_spatial_shapes",
                                src_spatial_shapes)
        self_attn = MultiHeadAttention(self.n_heads, self.dropout, name="self_attn",
                                       **layers.numerics(self))
        tgt2 = self_attn(tgt, tgt, tgt, query_pos, query_pos, deterministic=deterministic)
        tgt = self._residual(tgt, tgt2, "norm2", deterministic)
        tgt2 = self._deformable("cross_attn")(_with_pos(tgt, query_pos), reference_points, src,
                                              src_spatial_shapes, level_start_index,
                                              src_padding_mask)
        tgt = self._residual(tgt, tgt2, "norm1", deterministic)
        return self._ffn(tgt, "norm3", deterministic)


_LAYER_FIELDS = tuple(f for f in _DeformableLayer.__dataclass_fields__
                      if f not in ("parent", "name"))


# --- PyTorch weights (`interop.torch.from_torch`) ----------------------------------------
# Keys are Deformable DETR's: `sampling_offsets`, `attention_weights`, `value_proj`,
# `output_proj` (MSDeformAttn); `self_attn`/`cross_attn`, `linear1`, `linear2`, `norm1..3`
# (the layers; the decoder's `self_attn` is a torch `nn.MultiheadAttention`).


def _attention_rules(module: nn.Module) -> Rules:
    del module
    rules: Rules = {}
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        rules |= dense((name,), name)
    return rules


def _sequence(shapes: Shapes, key: str, length: int = 1) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, length, shapes[key][0]), jnp.float32)


def _attention_inputs(module: MSDeformAttn, shapes: Shapes) -> tuple:
    """`(query, reference_points, input_flatten, spatial_shapes)` with one query and one pixel
    per level, of the channels of `value_proj.bias`."""
    levels = module.n_levels
    query = _sequence(shapes, "value_proj.bias")
    return (query, jax.ShapeDtypeStruct((1, 1, levels, 2), jnp.float32),
            _sequence(shapes, "value_proj.bias", levels), SpatialShapes(((1, 1),) * levels))


def _layer_rules(module: _DeformableLayer, decoder: bool) -> Rules:
    rules = dense(("linear1",), "linear1") | dense(("linear2",), "linear2")
    rules |= nested(_attention_rules(module), ("cross_attn" if decoder else "self_attn",),
                    "cross_attn" if decoder else "self_attn")
    if decoder:
        rules |= nested(attention_rules(), ("self_attn",), "self_attn")
    for i in range(1, 4 if decoder else 3):
        rules |= layer_norm((f"norm{i}",), f"norm{i}")
    return rules


def _layer_inputs(decoder: bool, prefix: str = ""):
    def example_inputs(module: _DeformableLayer, shapes: Shapes) -> tuple:
        levels, key = module.n_levels, f"{prefix}norm1.bias"
        shapes_ = SpatialShapes(((1, 1),) * levels)
        if decoder:
            tgt = _sequence(shapes, key)
            return (tgt, None, jax.ShapeDtypeStruct((1, 1, levels, 2), jnp.float32),
                    _sequence(shapes, key, levels), shapes_)
        src = _sequence(shapes, key, levels)
        if prefix:  # the encoder stack: (src, spatial_shapes, level_start_index, valid_ratios)
            return src, shapes_, None, jax.ShapeDtypeStruct((1, levels, 2), jnp.float32)
        return src, None, jax.ShapeDtypeStruct((1, levels, levels, 2), jnp.float32), shapes_

    return example_inputs


register(MSDeformAttn)(Converter(_attention_rules, _attention_inputs))
register(DeformableTransformerEncoderLayer)(
    Converter(lambda m: _layer_rules(m, False), _layer_inputs(False)))
register(DeformableTransformerDecoderLayer)(
    Converter(lambda m: _layer_rules(m, True), _layer_inputs(True)))
register(DeformableTransformerEncoder)(Converter(
    lambda m: {p: r for i in range(m.num_layers)
               for p, r in nested(_layer_rules(m, False), (f"layers_{i}",),
                                  f"layers.{i}").items()},
    _layer_inputs(False, "layers.0.")))
