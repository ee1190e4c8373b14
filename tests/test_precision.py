"""`precision` reaches every layer: a module built with `precision=HIGHEST` passes it to every
convolution, dense layer and einsum module it calls (the one-module contract of
`flax_attention.layers`), for every public block with a `precision` field and whole networks.

The check traces `init` with `jax.eval_shape` (nothing is computed) under
`flax.linen.intercept_methods`, recording every submodule called.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import flax_attention as fa
from flax_attention import mechanisms
from flax_attention.functional import SpatialShapes
from flax_attention.models import classifiers, registry
from flax_attention.models.resnet import resnet18

HIGHEST = jax.lax.Precision.HIGHEST
# The layers whose `precision` must be HIGHEST; any other called module with a `precision`
# field (such as `layers.PointwiseConv`) must have it too.
LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum)


def _zeros(*shape: int) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


def called_modules(module: nn.Module, *inputs, **call_kwargs) -> list[nn.Module]:
    """Every module whose `__call__` runs in `module.init` (traced, not computed; every
    collection is mutable there, so a module takes the path that records its attention)."""
    seen: list[nn.Module] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            seen.append(context.module)
        return next_fun(*args, **kwargs)

    rngs = {name: jax.random.key(0) for name in ("params", "dropout", "sample")}

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(module.init, rngs, *inputs, **call_kwargs))
    return seen


def assert_precision_reaches_every_layer(module: nn.Module, *inputs,
                                         **call_kwargs) -> list[nn.Module]:
    """Asserts that every module that `module` with `precision=HIGHEST` calls and that has a
    `precision` field (every layer of `LAYERS` has) has HIGHEST; returns the called modules.

    Raises:
      AssertionError: naming each module (type and path) with another precision.
    """
    seen = called_modules(module.clone(precision=HIGHEST), *inputs, **call_kwargs)
    assert seen and seen[0].scope.path == (), "the module's own call was not intercepted"
    wrong = sorted({f"{type(m).__name__} {'/'.join(m.scope.path)}: {m.precision}"
                    for m in seen if getattr(m, "precision", HIGHEST) != HIGHEST})
    assert not wrong, f"precision dropped in {type(module).__name__}: {wrong}"
    return seen


def _has_precision(cls) -> bool:
    return (isinstance(cls, type) and issubclass(cls, nn.Module)
            and "precision" in {f.name for f in dataclasses.fields(cls)})


def _row_case(row: mechanisms.Mechanism) -> tuple[nn.Module, tuple, dict]:
    call_kwargs = {"train": True, **row.call_kwargs} if row.takes_train else dict(row.call_kwargs)
    return row.build(), tuple(_zeros(*shape) for shape in row.demo_shapes), call_kwargs


# Every public block with a `precision` field: (module, inputs, call keyword arguments): the
# rows of the mechanism table, and the blocks that are not rows of their own.
_SEQ = _zeros(1, 5, 8)
_LEVELS = SpatialShapes(((2, 2), (1, 1)))
_DEFORMABLE = {"n_levels": 2, "n_heads": 2, "n_points": 1}
_OTHER_BLOCKS = {
    "ChannelAttention": (fa.ChannelAttention(), (_zeros(1, 4, 4, 8),), {}),
    "CrissCrossAttention": (fa.CrissCrossAttention(), (_zeros(1, 4, 5, 16),), {}),
    "DANetHead": (fa.DANetHead(3), (_zeros(1, 4, 4, 32),), {"train": True}),
    "DeformableTransformer": (
        fa.DeformableTransformer(8, 2, 1, 1, 16, num_feature_levels=2, dec_n_points=1,
                                 enc_n_points=1),
        ([_zeros(1, 2, 2, 8), _zeros(1, 1, 1, 8)], None, [_zeros(1, 2, 2, 8), _zeros(1, 1, 1, 8)],
         _zeros(3, 16)), {}),
    "DeformableTransformerDecoder": (
        fa.DeformableTransformerDecoder(8, 16, num_layers=1, **_DEFORMABLE),
        (_zeros(1, 3, 8), _zeros(1, 3, 2), _SEQ, _LEVELS, None, jnp.ones((1, 2, 2))), {}),
    "DeformableTransformerDecoderLayer": (
        fa.DeformableTransformerDecoderLayer(8, 16, **_DEFORMABLE),
        (_zeros(1, 3, 8), None, _zeros(1, 3, 2, 2), _SEQ, _LEVELS), {}),
    "DeformableTransformerEncoder": (
        fa.DeformableTransformerEncoder(8, 16, num_layers=1, **_DEFORMABLE),
        (_SEQ, _LEVELS, None, jnp.ones((1, 2, 2))), {}),
    "DeformableTransformerEncoderLayer": (
        fa.DeformableTransformerEncoderLayer(8, 16, **_DEFORMABLE),
        (_SEQ, None, _zeros(1, 5, 2, 2), _LEVELS), {}),
    # The localization net is built by the caller, so it gets its own precision.
    "LocalizationNet": (fa.LocalizationNet(), (_zeros(1, 28, 28, 1),), {}),
    "MultiHeadAttention": (fa.MultiHeadAttention(2), (_zeros(1, 3, 8), _SEQ, _SEQ), {}),
    "NonLocal1D": (fa.NonLocal1D(), (_zeros(1, 6, 4),), {}),
    "NonLocal2D (concatenate)": (fa.NonLocal2D(mode="concatenate"), (_zeros(1, 4, 4, 4),), {}),
    "NonLocal3D": (fa.NonLocal3D(bn_layer=False), (_zeros(1, 2, 4, 4, 4),), {}),
    "PositionAttention": (fa.PositionAttention(), (_zeros(1, 4, 4, 16),), {}),
    "PreActBottleneck": (fa.PreActBottleneck(8, strides=2), (_zeros(1, 4, 4, 4),), {}),
    "RCCAModule": (fa.RCCAModule(8, num_classes=3), (_zeros(1, 4, 5, 32),), {"train": True}),
    "RecurrentAttentionModel": (fa.RecurrentAttentionModel(num_glimpses=2, glimpse_size=4,
                                                           num_scales=1, hidden=8),
                                (_zeros(1, 8, 8, 1),), {}),
    "ResidualAttentionModule": (fa.ResidualAttentionModule(), (_zeros(1, 8, 8, 8),), {}),
    "SEBasicBlock": (fa.SEBasicBlock(16, stride=2, reduction=4), (_zeros(1, 4, 4, 8),), {}),
    "SEBottleneck": (fa.SEBottleneck(4, reduction=4), (_zeros(1, 4, 4, 8),), {}),
    "SELayer": (fa.SELayer(reduction=4), (_zeros(1, 4, 4, 8),), {}),
    "SEModule": (fa.SEModule(), (_zeros(1, 4, 4, 16),), {}),
    "SelectiveKernelAttn": (fa.SelectiveKernelAttn(), (_zeros(1, 2, 4, 4, 16),), {"train": True}),
    "SpatialTransformer": (fa.SpatialTransformer(fa.LocalizationNet(precision=HIGHEST)),
                           (_zeros(1, 28, 28, 1),), {}),
    "Transformer": (fa.Transformer(8, 2, 1, 1, 16), (_zeros(1, 2, 3, 8), None, _zeros(3, 8),
                                                     _zeros(1, 2, 3, 8)), {}),
    "TransformerDecoder": (fa.TransformerDecoder(2, 16, num_layers=1), (_zeros(1, 3, 8), _SEQ),
                           {}),
    "TransformerDecoderLayer": (fa.TransformerDecoderLayer(2, 16), (_zeros(1, 3, 8), _SEQ), {}),
    "TransformerEncoder": (fa.TransformerEncoder(2, 16, num_layers=1), (_SEQ,), {}),
    "TransformerEncoderLayer": (fa.TransformerEncoderLayer(2, 16), (_SEQ,), {}),
}
BLOCKS = {**{row.name: _row_case(row) for row in mechanisms.MECHANISMS}, **_OTHER_BLOCKS}

_TINY_BACKBONE = functools.partial(resnet18, stage_sizes=(1, 1, 1, 1))
_IMAGES = _zeros(1, 32, 32, 3)
NETWORKS = {
    "se_resnet18": (registry.create("se_resnet18", 10), (_IMAGES,), {}),
    # Attention-56's stem and head around one attention module (the blocks are checked above).
    "residual_attention": (registry.create("residual_attention_56_cifar", 10,
                                           stage_sizes=(1, 0, 0)), (_IMAGES,), {}),
    **{name: (classifiers.create_classifier(name, 10, (42, 42, 1)), (_zeros(1, 42, 42, 1),), {})
       for name in classifiers.list_classifiers()},
    "ccnet": (registry.create("ccnet_resnet50", 3, backbone=_TINY_BACKBONE), (_IMAGES,),
              {"train": True}),
    "danet": (registry.create("danet_resnet50", 3, backbone=_TINY_BACKBONE, aux=True),
              (_IMAGES,), {}),
    "detr": (registry.create("detr_resnet50", 4, num_queries=3, backbone=_TINY_BACKBONE,
                             hidden_dim=16, nheads=2, num_encoder_layers=1, num_decoder_layers=1,
                             dim_feedforward=16), (_zeros(1, 64, 64, 3),), {}),
}


def test_every_public_block_with_precision_is_listed():
    public = {name for name in fa.__all__ if _has_precision(getattr(fa, name))}
    assert public == {name.split(" ")[0] for name in BLOCKS}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_precision_reaches_every_layer_of_block(name):
    module, inputs, call_kwargs = BLOCKS[name]
    assert_precision_reaches_every_layer(module, *inputs, **call_kwargs)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_precision_reaches_every_layer_of_network(name):
    module, inputs, call_kwargs = NETWORKS[name]
    seen = assert_precision_reaches_every_layer(module, *inputs, **call_kwargs)
    assert sum(isinstance(m, LAYERS) for m in seen) > 2


def test_the_check_fails_when_a_layer_ignores_precision():
    class Careless(nn.Module):
        precision: jax.lax.PrecisionLike = None

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3, precision=self.precision, name="careful")(x)
            return nn.Dense(2, name="careless")(x)

    with pytest.raises(AssertionError, match=r"\['Dense careless: None'\]"):
        assert_precision_reaches_every_layer(Careless(), _zeros(1, 4))
