"""ECA and CECA: functional ops and modules against the PyTorch reference (timm's names)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention.eca import CecaModule, EcaModule
from flax_attention.functional import eca as F
from flax_attention.interop.torch import from_torch
from flax_attention.resnet_blocks import BasicBlock
from tests.helpers import (
    assert_close,
    check_bfloat16_close,
    check_matches_torch,
    random_nhwc,
    state_dict,
    torch_gates,
)
from tests.reference import eca as ref

# --- hand-checkable values ------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 8, 63, 64, 127, 128, 255, 256, 512, 2047, 2048, 1 << 15])
def test_kernel_size_is_timms_rule(channels):
    assert F.eca_kernel_size(channels) == ref._kernel_size(channels, 3, 2, 1)
    assert F.eca_kernel_size(channels) == ref.EcaModule(channels).conv.kernel_size[0]


def test_kernel_sizes_by_hand():
    assert [F.eca_kernel_size(c) for c in (64, 128, 256, 2048)] == [3, 5, 5, 7]
    assert F.eca_kernel_size(256, gamma=1, beta=0) == 9


def test_zero_kernel_gives_gates_of_one_half():
    x = jnp.asarray(random_nhwc((2, 3, 4, 8)))
    for circular in (False, True):
        gates = F.eca_gates(x, jnp.zeros(3), circular=circular)
        np.testing.assert_array_equal(gates, np.full((2, 8), 0.5))
    np.testing.assert_array_equal(F.eca(x, jnp.zeros(5)), 0.5 * np.asarray(x))


def test_shift_kernel_gates_each_channel_by_its_neighbour():
    # Kernel [1, 0, 0] (cross-correlation) reads the channel before: channel c is gated by
    # sigmoid(mean of channel c - 1); channel 0 reads the zero padding (ECA) or the last
    # channel (CECA).
    x = jnp.asarray(random_nhwc((2, 3, 3, 6), seed=1))
    means = np.asarray(x).mean(axis=(1, 2))
    sig = jax.nn.sigmoid
    zero_padded = np.concatenate([np.zeros((2, 1)), means[:, :-1]], axis=1)
    wrapped = np.roll(means, 1, axis=1)
    shift = jnp.asarray([1.0, 0.0, 0.0])
    np.testing.assert_allclose(F.eca_gates(x, shift), sig(zero_padded), rtol=1e-6)
    np.testing.assert_allclose(F.eca_gates(x, shift, circular=True), sig(wrapped), rtol=1e-6)
    np.testing.assert_allclose(F.eca_gates(x, jnp.asarray([0.0, 2.0, 0.0]), jnp.asarray(1.0)),
                               sig(2 * means + 1), rtol=1e-6)


# --- equivalence with the reference ---------------------------------------------------------------

CASES = [
    pytest.param(EcaModule(), lambda c: ref.EcaModule(c), 32, id="eca"),
    pytest.param(EcaModule(), lambda c: ref.EcaModule(c), 256, id="eca-k5"),
    pytest.param(EcaModule(kernel_size=7), lambda c: ref.EcaModule(None, 7), 32, id="eca-fixed-k"),
    pytest.param(EcaModule(gate_layer="hard_sigmoid"),
                 lambda c: ref.EcaModule(c, gate_layer="hard_sigmoid"), 32, id="eca-hard"),
    pytest.param(EcaModule(use_mlp=True), lambda c: ref.EcaModule(c, use_mlp=True), 32,
                 id="ecam"),
    pytest.param(EcaModule(use_mlp=True, rd_channels=3, act_layer=jnp.tanh),
                 lambda c: ref.EcaModule(c, use_mlp=True, rd_channels=3, act_layer=torch.nn.Tanh),
                 32, id="ecam-tanh"),
    # timm's `channels` sets K (over `kernel_size`) whatever the input's C.
    pytest.param(EcaModule(channels=256), lambda c: ref.EcaModule(256), 32, id="eca-channels"),
    pytest.param(EcaModule(channels=64, kernel_size=7), lambda c: ref.EcaModule(64, 7), 32,
                 id="eca-channels-over-kernel_size"),
    pytest.param(EcaModule(channels=64, use_mlp=True), lambda c: ref.EcaModule(64, use_mlp=True),
                 32, id="ecam-channels"),
    pytest.param(CecaModule(channels=256), lambda c: ref.CecaModule(256), 32,
                 id="ceca-channels"),
    pytest.param(CecaModule(), lambda c: ref.CecaModule(c), 32, id="ceca"),
    pytest.param(CecaModule(), lambda c: ref.CecaModule(c), 256, id="ceca-k5"),
    pytest.param(CecaModule(act_layer=jax.nn.relu),
                 lambda c: ref.CecaModule(c, act_layer=torch.nn.ReLU), 32, id="ceca-bias"),
]


@pytest.mark.parametrize(("module", "make_torch", "channels"), CASES)
def test_matches_torch(module, make_torch, channels):
    torch_module = make_torch(channels)
    x = random_nhwc((2, 5, 4, channels), seed=2)
    intermediates = check_matches_torch(module, torch_module, x, seed=3)
    (gates,) = intermediates["attention"]
    assert gates.shape == (2, channels) and gates.dtype == jnp.float32
    assert_close(gates, torch_gates(torch_module, x))


def test_in_a_resnet_block_attention_slot():
    block = BasicBlock(32, attention=functools.partial(CecaModule))
    x = jnp.asarray(random_nhwc((2, 6, 6, 32)))
    variables = jax.jit(block.init)(jax.random.key(0), x)
    assert variables["params"]["se"]["conv"]["kernel"].shape == (3, 1, 1)
    out, state = jax.jit(functools.partial(block.apply, mutable=["intermediates"]))(variables, x)
    assert out.shape == x.shape
    assert state["intermediates"]["se"]["attention"][0].shape == (2, 32)


# --- transformations, gradients, dtypes -----------------------------------------------------------


def test_check_grads():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 3, 3, 8)))
        kernel, bias = jnp.asarray(rng.standard_normal(5)), jnp.asarray(rng.standard_normal(1))
        for circular in (False, True):
            fn = functools.partial(F.eca, circular=circular)
            check_grads(jax.jit(fn), (x, kernel, bias), order=1, modes=["rev"], atol=1e-5,
                        rtol=1e-5)


def test_jit_and_vmap_equal_eager():
    module = EcaModule(use_mlp=True)
    x = jnp.asarray(random_nhwc((2, 4, 4, 16)))
    variables = module.init(jax.random.key(0), x)
    eager = module.apply(variables, x)
    chex.assert_trees_all_close(jax.jit(module.apply)(variables, x), eager, atol=1e-6)

    xs = jnp.asarray(random_nhwc((3, 2, 4, 5, 8), seed=1))
    kernel = jnp.asarray(random_nhwc((3,), 2))
    fn = functools.partial(F.eca, circular=True)
    batched = jax.vmap(fn, in_axes=(0, None))(xs, kernel)
    looped = np.stack([fn(x, kernel) for x in xs])
    chex.assert_trees_all_close(batched, looped, atol=1e-6)


@pytest.mark.parametrize("module", [EcaModule(), CecaModule()], ids=["eca", "ceca"])
def test_bfloat16_is_finite_and_close(module):
    check_bfloat16_close(module, (2, 5, 5, 32))


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = jnp.zeros((2, 4, 4, 8))
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(4, 4, 8\)"):
        EcaModule().init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"kernel_size must be odd and >= 1, got 4"):
        CecaModule(kernel_size=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"gate must be one of .*'softmax2'"):
        EcaModule(gate_layer="softmax2").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"kernel must have rank 1 \(\[K\]\).*\(3, 1\)"):
        F.eca_gates(x, jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"kernel size \(kernel\[0\]\) must be odd.*got 2"):
        F.eca(x, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"y and kernel must agree in input features"):
        F.channel_conv(jnp.zeros((2, 8, 1)), jnp.zeros((3, 2, 1)))
    with pytest.raises(ValueError, match=r"channels must be >= 1, got 0"):
        F.eca_kernel_size(0)


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.EcaModule(64))
    with pytest.raises(ValueError, match=r"missing keys \['conv.weight'\]"):
        from_torch(EcaModule(), {})
    with pytest.raises(ValueError, match=r"unexpected keys \['conv.bias'\]"):
        from_torch(CecaModule(), {**sd, "conv.bias": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"misshaped keys.*conv.weight: expected \(5, 1, 1\)"):
        from_torch(EcaModule(kernel_size=5), sd)
    mlp_sd = state_dict(ref.EcaModule(64, use_mlp=True))
    with pytest.raises(ValueError, match=r"missing keys \['conv.bias', 'conv2.bias', 'conv2"):
        from_torch(EcaModule(use_mlp=True), sd)
    variables = from_torch(EcaModule(use_mlp=True), mlp_sd)
    assert variables["params"]["conv2"]["kernel"].shape == (3, 8, 1)
