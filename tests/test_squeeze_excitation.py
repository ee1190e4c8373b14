"""Squeeze-and-excitation: functional op, SELayer and SE blocks against the PyTorch reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention.functional.squeeze_excitation import (
    channel_max,
    excite,
    spatial_max,
    spatial_mean,
    squeeze_excitation,
    squeeze_excitation_gates,
)
from flax_attention.interop.torch import from_torch
from flax_attention.squeeze_excitation import SEBasicBlock, SEBottleneck, SELayer
from tests.helpers import (
    assert_close,
    check_bfloat16_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import squeeze_excitation as ref


def _imported(module, torch_module, seed: int = 0):
    return from_torch(module, state_dict(randomize_(torch_module, seed)))


def _torch_out(torch_module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_to_nhwc(torch_module(nhwc_to_torch(x)))


# --- hand-checkable values ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 56, 56, 3), (2, 7, 5), (1, 13, 4), (3, 2, 3, 5, 4),
                                   (0, 4, 4, 2)])
def test_spatial_mean_is_the_float64_mean(shape):
    """Rows of 8, 7, 5 (35 positions), 1 (13, prime) or 6 positions side by side, any rank."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 3.0
    expected = x.astype(np.float64).mean(tuple(range(1, x.ndim - 1)))
    got = jax.jit(spatial_mean, static_argnums=1)(jnp.asarray(x), jnp.float32)
    assert got.dtype == jnp.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (2, 7, 5), (1, 13, 4), (3, 2, 3, 5, 4)])
@pytest.mark.parametrize("which", ["spatial", "channel"])
def test_max_and_its_derivatives_are_jnp_max_s(shape, which):
    """Small integers, so many entries tie: both derivatives split evenly between them (as
    torch's `amax` does; for `spatial_max`, not between the first pass's rows first)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-2, 3, shape).astype(np.float32))
    fn, axes = {"spatial": (spatial_max, tuple(range(1, x.ndim - 1))),
                "channel": (channel_max, (x.ndim - 1,))}[which]
    out_shape = np.delete(shape, axes)
    weights = jnp.asarray(rng.standard_normal(out_shape).astype(np.float32))
    tangent = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    assert int((x == x.max(axes, keepdims=True)).sum(axes).max()) > 1

    def results(fn):
        return [fn(x), jax.grad(lambda x: (fn(x) * weights).sum())(x),
                jax.jvp(fn, (x,), (tangent,))[1]]

    for got, expected in zip(results(jax.jit(fn)), results(lambda x: jnp.max(x, axis=axes)),
                             strict=True):
        np.testing.assert_array_equal(got, expected)


def test_zero_weights_give_gates_of_one_half():
    x = jnp.asarray(random_nhwc((2, 3, 4, 8)))
    w1, w2 = jnp.zeros((8, 2)), jnp.zeros((2, 8))
    np.testing.assert_array_equal(squeeze_excitation_gates(x, w1, w2), np.full((2, 8), 0.5))
    np.testing.assert_array_equal(squeeze_excitation(x, w1, w2), 0.5 * np.asarray(x))


def test_gates_by_hand():
    # Channel 0 averages to 1, channel 1 to 3; hidden = relu(1 * 1 + 3 * 0) = 1;
    # gates = sigmoid([1, -1]) = [e, 1] / (1 + e).
    x = jnp.asarray([[[1.0, 2.0], [1.0, 4.0]]])  # [B=1, L=2, C=2]
    w1 = jnp.asarray([[1.0], [0.0]])
    w2 = jnp.asarray([[1.0, -1.0]])
    e = math.e
    expected_gates = np.array([[e / (1 + e), 1 / (1 + e)]])
    np.testing.assert_allclose(squeeze_excitation_gates(x, w1, w2), expected_gates, rtol=1e-6)
    np.testing.assert_allclose(
        squeeze_excitation(x, w1, w2), np.asarray(x) * expected_gates[:, None], rtol=1e-6
    )


# --- equivalence with the reference ---------------------------------------------------------------


@pytest.mark.parametrize(("shape", "reduction"), [
    ((2, 6, 16), 4), ((2, 5, 3, 16), 4), ((1, 2, 3, 4, 16), 4),
    ((2, 5, 3, 24), 16)])  # 24 // 16: one hidden unit, floored as the reference's
def test_se_layer_matches_torch_any_rank(shape, reduction):
    torch_se = ref.SELayer(shape[-1], reduction=reduction)
    variables = _imported(SELayer(reduction=reduction), torch_se)
    x = random_nhwc(shape, seed=1)
    out, state = SELayer(reduction=reduction).apply(variables, x, mutable=["intermediates"])
    assert_close(out, _torch_out(torch_se, x))
    with torch.no_grad():
        gates = torch_se.gates(nhwc_to_torch(x)).numpy()
    assert_close(state["intermediates"]["attention"][0], gates)


BLOCKS = [
    pytest.param(SEBasicBlock(8, reduction=4), ref.SEBasicBlock(8, 8, reduction=4), 8,
                 id="basic-identity"),
    pytest.param(SEBasicBlock(8, stride=2, reduction=4), ref.SEBasicBlock(6, 8, 2, 4), 6,
                 id="basic-stride2"),
    pytest.param(SEBottleneck(4, reduction=4), ref.SEBottleneck(16, 4, reduction=4), 16,
                 id="bottleneck-identity"),
    pytest.param(SEBottleneck(4, reduction=4), ref.SEBottleneck(8, 4, reduction=4), 8,
                 id="bottleneck-project"),
    pytest.param(SEBottleneck(4, stride=2, reduction=8, groups=4, base_width=32),
                 ref.SEBottleneck(12, 4, 2, 8, groups=4, base_width=32), 12,
                 id="resnext-stride2"),
]


def _with_downsample(module, torch_module):
    """from_torch needs the projection spelled out at stride 1 (it cannot see the input)."""
    return module.clone(use_downsample=torch_module.downsample is not None)


@pytest.mark.parametrize(("module", "torch_module", "cin"), BLOCKS)
def test_block_matches_torch(module, torch_module, cin):
    module = _with_downsample(module, torch_module)
    variables = _imported(module, torch_module, seed=2)
    x = random_nhwc((2, 7, 6, cin), seed=3)
    assert_close(module.apply(variables, x), _torch_out(torch_module, x))


def test_block_without_explicit_downsample_decides_from_input():
    torch_module = ref.SEBottleneck(8, 4, reduction=4)
    variables = _imported(_with_downsample(SEBottleneck(4, reduction=4), torch_module),
                          torch_module)
    x = random_nhwc((1, 4, 4, 8))
    assert_close(SEBottleneck(4, reduction=4).apply(variables, x), _torch_out(torch_module, x))


def test_block_training_mode_matches_torch_and_updates_statistics():
    torch_module = ref.SEBasicBlock(6, 8, 2, 4)
    module = SEBasicBlock(8, stride=2, reduction=4)
    variables = _imported(module, torch_module, seed=4)
    x = random_nhwc((3, 6, 6, 6), seed=5)
    out, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    torch_out = torch_to_nhwc(torch_module.train()(nhwc_to_torch(x)))
    assert_close(out, torch_out)
    # Running means and (unbiased) running variances of every BatchNorm are torch's.
    want = from_torch(module, state_dict(torch_module))["batch_stats"]
    chex.assert_trees_all_equal_structs(state["batch_stats"], want)
    jax.tree.map(assert_close, state["batch_stats"], want)


# --- transformations, gradients, dtypes -----------------------------------------------------------


def test_check_grads():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 3, 3, 8)))
        w1 = jnp.asarray(rng.standard_normal((8, 2)))
        w2 = jnp.asarray(rng.standard_normal((2, 8)))
        check_grads(squeeze_excitation, (x, w1, w2), order=1, modes=["rev"],
                    atol=1e-5, rtol=1e-5)


def test_jit_and_vmap_equal_eager():
    module = SEBottleneck(4, stride=2, reduction=4)
    x = jnp.asarray(random_nhwc((2, 6, 6, 8)))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    eager = module.apply(variables, x)
    chex.assert_trees_all_close(jax.jit(module.apply)(variables, x), eager, atol=1e-5)

    xs = jnp.asarray(random_nhwc((3, 2, 4, 5, 8), seed=1))
    w1, w2 = jnp.asarray(random_nhwc((8, 2), 2)), jnp.asarray(random_nhwc((2, 8), 3))
    batched = jax.vmap(squeeze_excitation, in_axes=(0, None, None))(xs, w1, w2)
    looped = np.stack([squeeze_excitation(x, w1, w2) for x in xs])
    chex.assert_trees_all_close(batched, looped, atol=1e-6)


def test_bfloat16_is_finite_and_close():
    check_bfloat16_close(SELayer(reduction=8), (2, 5, 5, 32), sown=False)  # bf16 gates


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = jnp.zeros((2, 4, 4, 12))
    with pytest.raises(ValueError, match=r"x must have rank >= 3.*\(2, 12\)"):
        squeeze_excitation(jnp.zeros((2, 12)), jnp.zeros((12, 3)), jnp.zeros((3, 12)))
    with pytest.raises(ValueError, match=r"x and w1 must agree in channels.*\(12, 3\)"):
        squeeze_excitation(jnp.zeros((2, 4, 10)), jnp.zeros((12, 3)), jnp.zeros((3, 12)))
    with pytest.raises(ValueError, match=r"w1 and w2 must agree in hidden units"):
        squeeze_excitation(x, jnp.zeros((12, 3)), jnp.zeros((4, 12)))
    with pytest.raises(ValueError, match=r"x and gates must agree in batch and channels"):
        excite(x, jnp.zeros((3, 12)))
    with pytest.raises(ValueError, match=r"x channels \(12\) must be at least reduction \(16"):
        SELayer(reduction=16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(4, 4, 12\)"):
        SEBasicBlock(12, reduction=4).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"channels \(12\) must be at least reduction"):
        SEBasicBlock(12, reduction=16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"use_downsample=False needs stride 1"):
        SEBasicBlock(12, stride=2, reduction=4, use_downsample=False).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"width .* must be >= 1"):
        SEBottleneck(4, reduction=4, base_width=8).init(jax.random.key(0), x)


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.SELayer(16, 4))
    with pytest.raises(ValueError, match=r"missing keys \['fc.2.weight'\]"):
        from_torch(SELayer(reduction=4), {"fc.0.weight": sd["fc.0.weight"]})
    with pytest.raises(ValueError, match=r"unexpected keys \['fc.1.weight'\]"):
        from_torch(SELayer(reduction=4), {**sd, "fc.1.weight": sd["fc.0.weight"]})
    with pytest.raises(ValueError, match=r"misshaped keys.*fc.2.weight: expected \(4, 16\)"):
        from_torch(SELayer(reduction=4), {**sd, "fc.2.weight": np.zeros((16, 5), np.float32)})
    block_sd = state_dict(ref.SEBasicBlock(8, 8, reduction=4))
    with pytest.raises(ValueError, match=r"set use_downsample=True or False"):
        from_torch(SEBasicBlock(8, reduction=4), block_sd)
    with pytest.raises(ValueError, match=r"missing keys \['downsample.0.weight'"):
        from_torch(SEBasicBlock(8, reduction=4, use_downsample=True), block_sd)


def test_from_torch_finds_every_converter_whichever_family_was_imported_first():
    """A fresh process that imported only the ResNet converters still converts an SELayer."""
    code = ("import flax_attention.models.resnet\n"
            "from flax_attention import SELayer\n"
            "from flax_attention.interop.torch import rules_for\n"
            "print(sorted(rules_for(SELayer())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "fc_0" in out.stdout
