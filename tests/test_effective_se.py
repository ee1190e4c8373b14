"""Effective squeeze-excitation: functional op and module against the PyTorch reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_attention.effective_se import EffectiveSEModule
from flax_attention.functional import effective_se as F
from flax_attention.interop.torch import from_torch
from flax_attention.resnet_blocks import Bottleneck
from tests.helpers import (
    assert_close,
    check_bfloat16_close,
    check_matches_torch,
    random_nhwc,
    state_dict,
    torch_gates,
)
from tests.reference import effective_se as ref

# --- hand-checkable values ------------------------------------------------------------------------


def test_zero_weights_give_gates_of_one_half():
    # hard_sigmoid(0) = relu6(3) / 6 = 1/2.
    x = jnp.asarray(random_nhwc((2, 3, 4, 8)))
    gates = F.effective_se_gates(x, jnp.zeros((8, 8)), jnp.zeros(8))
    np.testing.assert_array_equal(gates, np.full((2, 8), 0.5))
    np.testing.assert_array_equal(F.effective_se(x, jnp.zeros((8, 8)), jnp.zeros(8)),
                                  0.5 * np.asarray(x))


def test_hard_sigmoid_gates_by_hand():
    # Identity fc: the gate of a channel is clip(mean / 6 + 1/2, 0, 1); means 0, 1.5, 6, -6.
    x = jnp.broadcast_to(jnp.asarray([0.0, 1.5, 6.0, -6.0]), (1, 2, 3, 4))
    gates = F.effective_se_gates(x, jnp.eye(4), jnp.zeros(4))
    np.testing.assert_allclose(gates, [[0.5, 0.75, 1.0, 0.0]], rtol=1e-6)
    # With add_maxpool a channel of max 3 and mean 1 squeezes to 2: gate 2/6 + 1/2.
    x = jnp.asarray([0.0, 0.0, 3.0]).reshape(1, 1, 3, 1)
    gates = F.effective_se_gates(x, jnp.eye(1), jnp.zeros(1), add_maxpool=True)
    np.testing.assert_allclose(gates, [[2 / 6 + 0.5]], rtol=1e-6)


# --- equivalence with the reference ---------------------------------------------------------------


@pytest.mark.parametrize(("fields", "kwargs"), [
    ({}, {}),
    ({"add_maxpool": True}, {"add_maxpool": True}),
    ({"gate_layer": "sigmoid"}, {"gate_layer": "sigmoid"}),
], ids=["ese", "maxpool", "sigmoid"])
def test_matches_torch(fields, kwargs):
    torch_module = ref.EffectiveSEModule(24, **kwargs)
    x = random_nhwc((2, 5, 4, 24), seed=2)
    intermediates = check_matches_torch(EffectiveSEModule(**fields), torch_module, x, seed=3,
                                        scale=3.0)
    (gates,) = intermediates["attention"]
    assert gates.shape == (2, 24) and gates.dtype == jnp.float32
    if "gate_layer" not in fields:  # some gates saturate: both pieces of the hard sigmoid run
        assert np.isin(np.asarray(gates), [0.0, 1.0]).any()
    assert_close(gates, torch_gates(torch_module, x))


def test_in_a_resnet_block_attention_slot():
    block = Bottleneck(4, attention=functools.partial(EffectiveSEModule, add_maxpool=True))
    x = jnp.asarray(random_nhwc((1, 4, 4, 16)))
    variables = jax.jit(block.init)(jax.random.key(0), x)
    assert variables["params"]["se"]["fc"]["kernel"].shape == (1, 1, 16, 16)
    assert jax.jit(block.apply)(variables, x).shape == x.shape


# --- transformations, gradients, dtypes -----------------------------------------------------------


def test_check_grads_jit_vmap():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 3, 3, 6)))
        kernel, bias = jnp.asarray(rng.standard_normal((6, 6))), jnp.zeros(6)
        fn = functools.partial(F.effective_se, add_maxpool=True)
        check_grads(jax.jit(fn), (x, kernel, bias), order=1, modes=["rev"], atol=1e-5,
                        rtol=1e-5)
        batched = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(x[:, None], kernel, bias)
        np.testing.assert_allclose(batched[:, 0], fn(x, kernel, bias), rtol=1e-12)


def test_bfloat16_is_finite_and_close():
    check_bfloat16_close(EffectiveSEModule(), (2, 5, 5, 32))


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = jnp.zeros((2, 4, 4, 8))
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(2, 8\)"):
        EffectiveSEModule().init(jax.random.key(0), x[:, 0, 0])
    with pytest.raises(ValueError, match=r"gate must be one of .*'softmax2'"):
        EffectiveSEModule(gate_layer="softmax2").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"must agree in channels.*kernel \(8, 6\)"):
        F.effective_se(x, jnp.zeros((8, 6)), jnp.zeros(8))
    with pytest.raises(ValueError, match=r"bias must have rank 1"):
        F.effective_se_gates(x, jnp.zeros((8, 8)), jnp.zeros((1, 8)))


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.EffectiveSEModule(8))
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\]"):
        from_torch(EffectiveSEModule(), {"fc.weight": sd["fc.weight"]})
    with pytest.raises(ValueError, match=r"misshaped keys.*fc.bias: expected \(8,\)"):
        from_torch(EffectiveSEModule(), {**sd, "fc.bias": np.zeros(6, np.float32)})
