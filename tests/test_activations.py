"""The activations and gates by timm's names (`functional.activations`) against torch's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from flax_attention.functional.activations import ACTIVATIONS, activation_function

# timm's definitions (`timm/layers/create_act.py`, `activations.py`), in torch.
TORCH = {
    "silu": TF.silu, "swish": TF.silu, "mish": TF.mish, "relu": TF.relu, "relu6": TF.relu6,
    "leaky_relu": TF.leaky_relu, "elu": TF.elu, "celu": TF.celu, "selu": TF.selu,
    "gelu": TF.gelu, "gelu_tanh": lambda x: TF.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "sigmoid": torch.sigmoid,
    "tanh": torch.tanh, "hard_sigmoid": TF.hardsigmoid, "hardsigmoid": TF.hardsigmoid,
    "hard_swish": TF.hardswish, "hardswish": TF.hardswish,
    "hard_mish": lambda x: 0.5 * x * (x + 2).clamp(min=0, max=2), "identity": lambda x: x,
}


def test_every_name_has_a_torch_twin():
    assert set(TORCH) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_matches_torch(name):
    # Points on both sides of every kink (0, +-2, +-3, +-6).
    x = np.concatenate([np.linspace(-8, 8, 161), [-3.0, -2.0, 0.0, 2.0, 3.0, 6.0]])
    x = x.astype(np.float32)
    expected = TORCH[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(activation_function(name)(jnp.asarray(x)), expected, rtol=1e-6,
                               atol=1e-6)


def test_names_are_case_insensitive_and_callables_pass_through():
    assert activation_function("Hard_Sigmoid") is ACTIVATIONS["hard_sigmoid"]
    assert activation_function(jnp.sin) is jnp.sin


@pytest.mark.parametrize("bad", ["softplus2", 3, None])
def test_unknown_names_and_non_functions_raise(bad):
    with pytest.raises(ValueError, match="gate_layer"):
        activation_function(bad, "gate_layer")
