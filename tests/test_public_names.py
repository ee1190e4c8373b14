"""The public names of the design contract import from `flax_attention` (and
`flax_attention.models`) as what they name: functions and module classes, never a submodule."""

from __future__ import annotations

import inspect
import types

import jax.numpy as jnp
import numpy as np
import pytest

import flax_attention as fa
from flax_attention import functional, models

FUNCTIONS = [
    "dot_product_attention", "criss_cross_attention", "criss_cross_weights",
    "criss_cross_aggregate", "affine_grid", "bilinear_sample", "position_attention",
    "channel_attention", "non_local", "ms_deform_attn", "deform_conv2d",
]
CLASSES = [
    "SELayer", "SEBasicBlock", "SEBottleneck", "NonLocal1D", "NonLocal2D", "NonLocal3D",
    "PositionAttention", "ChannelAttention", "DANetHead", "CrissCrossAttention", "RCCAModule",
    "SpatialTransformer", "ResidualAttentionModule", "MultiHeadAttention",
    "TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer", "PositionEmbeddingSine",
    "PositionEmbeddingLearned", "GlimpseSensor", "RecurrentAttentionModel", "EcaModule",
    "CecaModule", "EffectiveSEModule", "GatherExcite", "GlobalContext", "CbamModule",
    "LightCbamModule", "SelectiveKernel", "CoordAttention", "MSDeformAttn", "DeformConv2d",
]
MODELS = [f"se_resnet{depth}" for depth in (18, 34, 50, 101, 152)] + [
    "residual_attention_56", "residual_attention_92"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functions_are_the_functional_ones(name):
    assert name in fa.__all__
    assert getattr(fa, name) is getattr(functional, name)
    assert inspect.isfunction(getattr(fa, name))


@pytest.mark.parametrize("name", CLASSES)
def test_classes_are_exported(name):
    assert name in fa.__all__
    assert inspect.isclass(getattr(fa, name))


@pytest.mark.parametrize("name", MODELS)
def test_models_are_exported(name):
    assert callable(getattr(models, name))


def test_no_public_name_is_a_submodule():
    submodules = [n for n in fa.__all__ if isinstance(getattr(fa, n), types.ModuleType)]
    assert submodules == ["functional"]


def test_non_local_is_the_function_and_its_module_still_imports():
    from flax_attention.non_local import NonLocal2D

    assert NonLocal2D is fa.NonLocal2D
    theta, phi, g = jnp.ones((1, 4, 2)), jnp.zeros((1, 3, 2)), jnp.arange(6.0).reshape(1, 3, 2)
    out = fa.non_local(theta, phi, g, "embedded")  # equal logits: the mean of g's rows
    np.testing.assert_allclose(out, np.broadcast_to([[2.0, 3.0]], (1, 4, 2)), rtol=1e-6)
