"""Coordinate attention: functional ops and CoordAttention against both PyTorch references
(timm's `CoordAttn` and houqb's `CoordAtt`)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.coord_attention import CoordAttention
from flax_attention.functional import coord_attention as F
from flax_attention.interop.torch import from_torch
from flax_attention.resnet_blocks import BasicBlock
from tests.helpers import (
    assert_close,
    check_bfloat16_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import coord_attention as ref

_SHAPE = (2, 8, 9, 32)


def _timm(seed: int = 0, channels: int = 32, **kwargs):
    torch_ca = randomize_(ref.CoordAttn(channels, **kwargs), seed)
    module = CoordAttention(**kwargs)
    return module, from_torch(module, state_dict(torch_ca)), torch_ca


def _houqb(seed: int = 0, channels: int = 32, reduction: int = 32):
    torch_ca = randomize_(ref.CoordAtt(channels, channels, reduction), seed)
    module = CoordAttention(variant="houqb", reduction=reduction)
    return module, from_torch(module, state_dict(torch_ca)), torch_ca


def _torch_gates(torch_ca, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a_h `[B, H, C]` and a_w `[B, W, C]` of the reference."""
    with torch.no_grad():
        a_h, a_w = torch_ca.gates(nhwc_to_torch(x))
    return a_h[..., 0].transpose(1, 2).numpy(), a_w[:, :, 0].transpose(1, 2).numpy()


# --- hand-checkable values ------------------------------------------------------------------------


def test_pool_by_hand():
    x = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(1, 2, 3, 1)  # rows [0 1 2], [3 4 5]
    np.testing.assert_allclose(F.coordinate_pool(x)[0, :, 0], [1.0, 4.0, 1.5, 2.5, 3.5])


def test_excite_and_map_by_hand():
    x = jnp.ones((1, 2, 3, 2))
    gate_h = jnp.asarray([[[1.0, 0.5], [0.0, 1.0]]])  # rows
    gate_w = jnp.asarray([[[1.0, 1.0], [0.5, 0.5], [0.0, 2.0]]])  # columns
    out = F.coordinate_excite(x, gate_h, gate_w)
    np.testing.assert_allclose(out[0, 0, 2], [0.0, 1.0])  # row 0, column 2
    np.testing.assert_allclose(out[0, 1, 1], [0.0, 0.5])
    expected_map = [[[1.0 * 1 + 0.5 * 1, 0.5 + 0.25, 0.0 + 1.0],
                     [0.0 + 1.0, 0.0 + 0.5, 0.0 + 2.0]]]
    np.testing.assert_allclose(F.coordinate_attention_map(gate_h, gate_w),
                               np.asarray(expected_map) / 2)


def test_zero_gate_convs_give_gates_of_one_half():
    module, variables, _ = _timm()
    params = dict(variables["params"])
    for name in ("conv_h", "conv_w"):
        params[name] = {"kernel": jnp.zeros_like(params[name]["kernel"])}
    x = random_nhwc(_SHAPE, seed=1)
    out, state = module.apply({**variables, "params": params}, x, mutable=["intermediates"])
    found = state["intermediates"]
    np.testing.assert_array_equal(found["gate_h"][0], np.full((2, 8, 32), 0.5))
    np.testing.assert_array_equal(found["attention"][0], np.full((2, 8, 9), 0.25))
    assert_close(out, x / 4)


def test_uniform_image_gives_uniform_attention():
    module, variables, _ = _houqb(seed=2)
    x = np.broadcast_to(random_nhwc((2, 1, 1, 32), seed=3), _SHAPE)
    _, state = module.apply(variables, x, mutable=["intermediates"])
    attention = state["intermediates"]["attention"][0]
    np.testing.assert_allclose(attention, np.broadcast_to(attention[:, :1, :1], (2, 8, 9)),
                               rtol=1e-6)


def test_hidden_widths():
    assert CoordAttention().hidden_channels(64) == 8  # make_divisible(64 / 24, 8, round_limit=0)
    assert CoordAttention().hidden_channels(512) == 24
    assert CoordAttention(variant="houqb").hidden_channels(128) == 8  # max(8, 128 // 32)
    assert CoordAttention(variant="houqb").hidden_channels(960) == 30
    assert CoordAttention(rd_channels=5, variant="houqb").hidden_channels(960) == 5


# --- equivalence with the references --------------------------------------------------------------

CASES = [
    pytest.param(_timm, {}, id="timm"),
    pytest.param(_timm, {"bias": True, "gate_layer": "hard_sigmoid", "has_skip": True},
                 id="timm-bias-hardsigmoid-skip"),
    pytest.param(_timm, {"channels": 64, "rd_channels": 12}, id="timm-rd_channels"),
    pytest.param(_timm, {"gate_layer": "hardsigmoid"}, id="timm-hardsigmoid-alias"),
    pytest.param(_houqb, {}, id="houqb"),
    pytest.param(_houqb, {"channels": 64, "reduction": 4}, id="houqb-reduction4"),
]


@pytest.mark.parametrize(("make", "kwargs"), CASES)
def test_matches_torch(make, kwargs):
    module, variables, torch_ca = make(**kwargs)
    x = random_nhwc((*_SHAPE[:3], kwargs.get("channels", 32)), seed=1)
    out, state = module.apply(variables, x, mutable=["intermediates"])
    with torch.no_grad():
        expected = torch_to_nhwc(torch_ca(nhwc_to_torch(x)))
    assert_close(out, expected)
    a_h, a_w = _torch_gates(torch_ca, x)
    found = state["intermediates"]
    assert_close(found["gate_h"][0], a_h)
    assert_close(found["gate_w"][0], a_w)
    assert found["attention"][0].shape == _SHAPE[:3]
    assert_close(found["attention"][0], np.einsum("bhc,bwc->bhw", a_h, a_w) / a_h.shape[-1])


def test_mbv2_names_load_the_same_weights():
    module, variables, torch_ca = _houqb(seed=13)
    renamed = {k.replace("conv_h", "conv2").replace("conv_w", "conv3"): v
               for k, v in state_dict(torch_ca).items()}
    mbv2 = CoordAttention(variant="houqb_mbv2")
    chex.assert_trees_all_equal(from_torch(mbv2, renamed), variables)
    with pytest.raises(ValueError, match=r"missing keys \['conv2.bias', 'conv2.weight'"):
        from_torch(mbv2, state_dict(torch_ca))


@pytest.mark.parametrize("make", [_timm, _houqb])
def test_input_gradients_match_torch(make):
    module, variables, torch_ca = make(seed=4)
    x = random_nhwc(_SHAPE, seed=5)
    cotangent = random_nhwc(_SHAPE, seed=6)
    grad = jax.jit(lambda x, ct: jax.vjp(lambda x: module.apply(variables, x), x)[1](ct)[0])(
        jnp.asarray(x), jnp.asarray(cotangent))
    tx = nhwc_to_torch(x).requires_grad_(True)
    torch_ca(tx).backward(nhwc_to_torch(cotangent))
    assert_close(grad, torch_to_nhwc(tx.grad), rtol=2e-5)


def test_training_mode_matches_torch_and_updates_statistics():
    module, variables, torch_ca = _houqb(seed=7)
    x = random_nhwc(_SHAPE, seed=8)
    out, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    expected = torch_to_nhwc(torch_ca.train()(nhwc_to_torch(x)))
    assert_close(out, expected, rtol=2e-5)
    assert_close(state["batch_stats"]["bn1"]["mean"], torch_ca.bn1.running_mean.numpy())


# --- in a block, transformations, dtypes ----------------------------------------------------------


def test_works_in_a_resnet_attention_slot():
    block = BasicBlock(32, attention=functools.partial(CoordAttention))
    x = jax.ShapeDtypeStruct(_SHAPE, jnp.float32)
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
    assert set(variables["params"]["se"]) == {"conv1", "bn1", "conv_h", "conv_w"}
    assert jax.eval_shape(block.apply, variables, x).shape == _SHAPE


def test_jit_vmap_grad():
    module, variables, _ = _timm(seed=9, channels=16)
    x = jnp.asarray(random_nhwc((2, 5, 6, 16), seed=10))
    eager = module.apply(variables, x)
    chex.assert_trees_all_close(jax.jit(module.apply)(variables, x), eager, atol=1e-6)
    batched = jax.jit(jax.vmap(lambda xi: module.apply(variables, xi[None])[0]))(x)
    chex.assert_trees_all_close(batched, eager, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p, x: module.apply({**variables, "params": p}, x).sum(),
                             argnums=(0, 1)))(variables["params"], x)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[0]["conv_w"]["kernel"]).max()) > 0


def test_bfloat16_is_finite_and_close():
    module, variables, _ = _timm(seed=11, channels=16)
    check_bfloat16_close(module, random_nhwc((2, 5, 6, 16), seed=12), variables, rtol=3e-2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(8, 9, 32\)"):
        CoordAttention().init(key, jnp.zeros(_SHAPE[1:]))
    with pytest.raises(ValueError, match=r"variant must be one of \('timm', 'houqb', 'houqb_m"):
        CoordAttention(variant="mbv2").init(key, jnp.zeros(_SHAPE))
    with pytest.raises(ValueError, match=r"gate_layer must be one of"):
        CoordAttention(gate_layer="softmax2").init(key, jnp.zeros(_SHAPE))
    with pytest.raises(ValueError, match=r"gate_h and gate_w must agree in batch and channels"):
        F.coordinate_attention_map(jnp.zeros((2, 4, 8)), jnp.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match=r"x and gates must agree in shape.*\(2, 4, 6, 8\)"):
        F.coordinate_excite(jnp.zeros((2, 4, 5, 8)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 6, 8)))
    with pytest.raises(ValueError, match=r"gate_w must have rank 3"):
        F.coordinate_excite(jnp.zeros((2, 4, 5, 8)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"x must not be empty.*\(2, 4, 0, 8\)"):
        F.coordinate_pool(jnp.zeros((2, 4, 0, 8)))  # the column means would be over nothing
    with pytest.raises(ValueError, match=r"gate_h must not be empty.*\(2, 4, 0\)"):
        F.coordinate_attention_map(jnp.zeros((2, 4, 0)), jnp.zeros((2, 5, 0)))  # mean over C = 0


def test_from_torch_rejects_bad_state_dicts():
    timm_sd, houqb_sd = state_dict(ref.CoordAttn(32)), state_dict(ref.CoordAtt(32, 32))
    with pytest.raises(ValueError, match=r"unexpected keys \['conv1.bias', 'conv_h.bias', 'co"):
        from_torch(CoordAttention(), houqb_sd)
    with pytest.raises(ValueError, match=r"missing keys \['conv1.bias', 'conv_h.bias', 'conv_w"):
        from_torch(CoordAttention(variant="houqb"), timm_sd)
    with pytest.raises(ValueError, match=r"misshaped keys.*conv1.weight: expected \(1, 1, 32, 16"):
        from_torch(CoordAttention(rd_channels=16), timm_sd)
