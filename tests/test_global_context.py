"""Global context attention: functional ops and GlobalContext against the timm-form reference."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.functional import global_context as F
from flax_attention.global_context import GlobalContext
from flax_attention.interop.torch import from_torch, rules_for
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
from tests.reference import global_context as ref

SHAPE = (2, 8, 9, 32)


def _pair(seed: int = 0, **kwargs):
    """A randomised torch reference and the Flax module with its weights."""
    torch_module = randomize_(ref.GlobalContext(SHAPE[-1], **kwargs), seed)
    module = GlobalContext(**kwargs)
    return module, from_torch(module, state_dict(torch_module)), torch_module


def _run(module, variables, x, **kwargs):
    """`module.apply`, jitted: on the CPU one compilation costs less than eager dispatch."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


# --- hand-checkable values ------------------------------------------------------------------------


def test_equal_logits_give_uniform_weights_and_the_mean():
    x = jnp.asarray(random_nhwc(SHAPE))
    weights = F.global_context_weights(jnp.full(SHAPE[:3], 3.0))
    np.testing.assert_allclose(weights, np.full(SHAPE[:3], 1 / 72), rtol=1e-6)
    assert_close(F.global_context_pool(x, weights), np.asarray(x).mean(axis=(1, 2)))


def test_one_dominant_logit_picks_its_position():
    x = jnp.asarray(random_nhwc(SHAPE))
    logits = jnp.zeros(SHAPE[:3]).at[0, 2, 3].set(100.0).at[1, 7, 8].set(100.0)
    context = F.global_context_pool(x, F.global_context_weights(logits))
    assert_close(context, np.stack([x[0, 2, 3], x[1, 7, 8]]))


def test_fusion_by_hand():
    x = jnp.asarray(random_nhwc((2, 3, 4, 5)))
    zeros = lambda v: jnp.zeros_like(v)  # noqa: E731
    out, weights = F.global_context(x, jnp.zeros((2, 3, 4)), mlp_scale=zeros)
    np.testing.assert_allclose(out, 0.5 * np.asarray(x), rtol=1e-6)  # sigmoid(0) = 1/2
    np.testing.assert_allclose(weights, np.full((2, 3, 4), 1 / 12), rtol=1e-6)
    # Average pooling, add fusion of the context itself: every position gains its mean.
    out, weights = F.global_context(x, None, mlp_add=lambda v: v)
    assert weights is None
    assert_close(out, np.asarray(x) + np.asarray(x).mean(axis=(1, 2), keepdims=True))


def test_fresh_add_fusion_block_is_the_identity():
    # timm starts `mlp_add.fc2` at zero (and flax's biases start at zero too).
    module = GlobalContext(fuse_add=True, fuse_scale=False)
    x = jnp.asarray(random_nhwc(SHAPE))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    np.testing.assert_array_equal(_run(module, variables, x), x)


def test_hidden_width_follows_make_divisible():
    assert GlobalContext().hidden_channels(64) == 8
    assert GlobalContext().hidden_channels(20) == 3  # int(2.5 + 0.5) with divisor 1
    assert GlobalContext(rd_divisor=8).hidden_channels(32) == 8
    assert GlobalContext(rd_channels=3).hidden_channels(64) == 3
    assert GlobalContext(rd_channels=0).hidden_channels(64) == 64  # timm's ConvMlp: 0 -> C


# --- equivalence with the reference ---------------------------------------------------------------

CONFIGS = [
    pytest.param({}, id="default-scale"),
    pytest.param({"fuse_add": True, "fuse_scale": False}, id="gca-add"),
    pytest.param({"fuse_add": True, "rd_channels": 5}, id="add-and-scale"),
    pytest.param({"use_attn": False, "rd_divisor": 8}, id="avg-pool"),
    pytest.param({"rd_channels": 0}, id="zero-hidden-is-C"),  # timm's ConvMlp: 0 -> C
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_matches_torch_values_weights_and_input_gradients(kwargs):
    module, variables, torch_module = _pair(1, **kwargs)
    x, cotangent = random_nhwc(SHAPE, 2), random_nhwc(SHAPE, 3)
    (out, state), vjp = jax.vjp(
        jax.jit(lambda x: module.apply(variables, x, mutable=["intermediates"])), jnp.asarray(x))
    (grad,) = vjp((jnp.asarray(cotangent), jax.tree.map(jnp.zeros_like, state)))
    x_t = nhwc_to_torch(x).requires_grad_(True)
    out_t = torch_module(x_t)
    out_t.backward(nhwc_to_torch(cotangent))
    assert_close(out, torch_to_nhwc(out_t))
    assert_close(grad, torch_to_nhwc(x_t.grad), rtol=1e-4)
    if kwargs.get("use_attn", True):
        with torch.no_grad():
            expected = torch_module.attention(nhwc_to_torch(x)).numpy()
        (weights,) = state["intermediates"]["attention"]
        assert weights.shape == SHAPE[:3] and weights.dtype == jnp.float32
        assert_close(weights, expected)
    else:
        assert "intermediates" not in state or not state["intermediates"]


def test_gates_and_activations_by_timms_names():
    module, variables, torch_module = _pair(1, fuse_add=True)
    x = jnp.asarray(random_nhwc(SHAPE, 2))
    named = GlobalContext(fuse_add=True, act_layer="ReLU", gate_layer="sigmoid")
    np.testing.assert_array_equal(_run(named, variables, x), _run(module, variables, x))
    hard = GlobalContext(gate_layer="hard_sigmoid")
    torch_hard = randomize_(ref.GlobalContext(SHAPE[-1], gate_layer=torch.nn.Hardsigmoid), 1)
    with torch.no_grad():
        expected = torch_to_nhwc(torch_hard(nhwc_to_torch(np.asarray(x))))
    assert_close(_run(hard, from_torch(hard, state_dict(torch_hard)), x), expected)


def test_layer_norm_is_two_pass_as_torchs():
    # Hidden features near 1000: a one-pass variance (E[v^2] - E[v]^2) loses about six digits.
    module, variables, torch_module = _pair(1, fuse_add=True, fuse_scale=False)
    with torch.no_grad():
        torch_module.mlp_add.fc1.bias += 1000.0
    variables = from_torch(module, state_dict(torch_module))
    x = random_nhwc(SHAPE, 2)
    with torch.no_grad():
        expected = torch_to_nhwc(torch_module(nhwc_to_torch(x)))
    assert_close(_run(module, variables, jnp.asarray(x)), expected)


def test_in_a_resnet_block_attention_slot():
    block = BasicBlock(32, attention=functools.partial(GlobalContext, fuse_add=True))
    x = jnp.asarray(random_nhwc(SHAPE))
    variables = jax.eval_shape(block.init, jax.random.key(0), x)  # shapes only: fast
    assert set(variables["params"]["se"]) == {"conv_attn", "mlp_scale", "mlp_add"}
    assert jax.eval_shape(block.apply, variables, x).shape == SHAPE
    keys = {r.key for r in rules_for(block.clone(use_downsample=False)).values()}
    assert {"se.conv_attn.weight", "se.mlp_add.norm.bias", "se.mlp_scale.fc2.weight"} <= keys


# --- transformations, gradients, dtypes -----------------------------------------------------------


def test_jit_vmap_and_grad():
    module, variables, _ = _pair(4, fuse_add=True)
    x = jnp.asarray(random_nhwc(SHAPE, 5))
    eager = module.apply(variables, x)
    chex.assert_trees_all_close(jax.jit(module.apply)(variables, x), eager, atol=1e-6)

    xs = jnp.asarray(random_nhwc((3, 2, 4, 5, 6), 6))
    logits = jnp.asarray(random_nhwc((3, 2, 4, 5), 7))
    op = lambda x, g: F.global_context(x, g, mlp_add=jnp.tanh)[0]  # noqa: E731
    looped = np.stack([jax.jit(op)(a, b) for a, b in zip(xs, logits, strict=True)])
    chex.assert_trees_all_close(jax.jit(jax.vmap(op))(xs, logits), looped, atol=1e-6)

    loss = lambda p: jnp.sum(module.apply({"params": p}, x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["conv_attn"]["kernel"]).max()) > 0


def test_bfloat16_is_finite_and_close():
    module, variables, _ = _pair(8, fuse_add=True)
    check_bfloat16_close(module, random_nhwc(SHAPE, 9), variables, rtol=3e-2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(8, 9, 32\)"):
        jax.eval_shape(GlobalContext().init, jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"x and logits must agree in batch and spatial"):
        F.global_context(x, jnp.zeros((2, 9, 8)))
    with pytest.raises(ValueError, match=r"logits must have rank 3.*\(2, 8, 9, 1\)"):
        F.global_context_weights(jnp.zeros((2, 8, 9, 1)))
    with pytest.raises(ValueError, match=r"x and weights must agree.*weights \(1, 8, 9\)"):
        F.global_context_pool(x, jnp.zeros((1, 8, 9)))
    with pytest.raises(ValueError, match=r"x and scale must agree in batch and channels"):
        F.fuse_context(x, scale=jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match=r"add must have rank 2"):
        F.fuse_context(x, add=jnp.zeros((2, 1, 1, 32)))


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.GlobalContext(32))
    with pytest.raises(ValueError, match=r"missing keys \['mlp_add\.fc1\.bias'"):
        from_torch(GlobalContext(fuse_add=True), sd)
    with pytest.raises(ValueError, match=r"unexpected keys \['conv_attn\.bias', 'conv_attn"):
        from_torch(GlobalContext(use_attn=False), sd)
    with pytest.raises(ValueError, match=r"misshaped keys.*mlp_scale\.fc1\.weight"):
        from_torch(GlobalContext(rd_channels=3), sd)
