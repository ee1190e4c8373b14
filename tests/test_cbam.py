"""CBAM and light CBAM: functional ops and the modules against the timm-form reference."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.cbam import CbamModule, LightCbamModule
from flax_attention.functional import cbam as F
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
from tests.reference import cbam as ref

SHAPE = (2, 8, 9, 32)
MODULES = {"cbam": (CbamModule, ref.CbamModule), "lcbam": (LightCbamModule, ref.LightCbamModule)}


def _pair(kind: str, seed: int = 0, **kwargs):
    """A randomised torch reference and the Flax module with its weights."""
    flax_cls, torch_cls = MODULES[kind]
    torch_module = randomize_(torch_cls(SHAPE[-1], **kwargs), seed)
    module = flax_cls(**kwargs)
    return module, from_torch(module, state_dict(torch_module)), torch_module


def _run(module, variables, x, **kwargs):
    """`module.apply`, jitted: on the CPU one compilation costs less than eager dispatch."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


# --- hand-checkable values ------------------------------------------------------------------------


def test_pools_by_hand():
    x = jnp.asarray([[[[1.0, 2.0, 6.0]], [[-1.0, -2.0, 0.0]]]])  # [B=1, H=2, W=1, C=3]
    np.testing.assert_allclose(F.cbam_spatial_pool(x)[0, :, 0], [[3.0, 6.0], [-1.0, 0.0]])
    np.testing.assert_allclose(F.cbam_spatial_pool(x, light=True)[0, :, 0, 0], [4.5, -0.5])
    identity = lambda v: v  # noqa: E731
    # avg [0, 0, 3], max [1, 2, 6]: gates sigmoid(avg + max), light sigmoid((avg + max) / 2).
    np.testing.assert_allclose(F.cbam_channel_gates(x, identity), jax.nn.sigmoid(jnp.asarray(
        [[1.0, 2.0, 9.0]])), rtol=1e-6)
    np.testing.assert_allclose(F.cbam_channel_gates(x, identity, light=True), jax.nn.sigmoid(
        jnp.asarray([[0.5, 1.0, 4.5]])), rtol=1e-6)


def test_zero_weights_give_gates_of_one_half():
    module = CbamModule()
    x = jnp.asarray(random_nhwc(SHAPE))
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    variables["batch_stats"]["spatial"]["bn"]["var"] = jnp.ones((1,))
    out, state = _run(module, variables, x, mutable=["intermediates"])
    np.testing.assert_allclose(state["intermediates"]["channel_gates"][0], np.full((2, 32), 0.5))
    np.testing.assert_allclose(state["intermediates"]["attention"][0], np.full(SHAPE[:3], 0.5))
    np.testing.assert_allclose(out, 0.25 * np.asarray(x), rtol=1e-6)


@pytest.mark.parametrize("kind", MODULES)
def test_uniform_image_gives_uniform_spatial_attention(kind):
    module, variables, _ = _pair(kind, 1, spatial_kernel_size=1)
    x = jnp.broadcast_to(jnp.asarray(random_nhwc((2, 1, 1, 32))), SHAPE)
    _, state = _run(module, variables, x, mutable=["intermediates"])
    attention = np.asarray(state["intermediates"]["attention"][0])
    np.testing.assert_allclose(attention, attention[:, :1, :1].repeat(8, 1).repeat(9, 2),
                               rtol=1e-6)


# --- equivalence with the reference ---------------------------------------------------------------

CONFIGS = [
    pytest.param("cbam", {}, id="cbam"),
    pytest.param("lcbam", {}, id="lcbam"),
    pytest.param("cbam", {"mlp_bias": True, "spatial_kernel_size": 3, "rd_channels": 6},
                 id="cbam-bias-k3"),
    pytest.param("lcbam", {"rd_ratio": 0.25, "rd_divisor": 4}, id="lcbam-ratio"),
]


@pytest.mark.parametrize(("kind", "kwargs"), CONFIGS)
def test_matches_torch_values_gates_and_input_gradients(kind, kwargs):
    module, variables, torch_module = _pair(kind, 2, **kwargs)
    x, cotangent = random_nhwc(SHAPE, 3), random_nhwc(SHAPE, 4)
    (out, state), vjp = jax.vjp(
        jax.jit(lambda x: module.apply(variables, x, mutable=["intermediates"])), jnp.asarray(x))
    (grad,) = vjp((jnp.asarray(cotangent), jax.tree.map(jnp.zeros_like, state)))
    x_t = nhwc_to_torch(x).requires_grad_(True)
    out_t = torch_module(x_t)
    out_t.backward(nhwc_to_torch(cotangent))
    assert_close(out, torch_to_nhwc(out_t))
    assert_close(grad, torch_to_nhwc(x_t.grad), rtol=1e-4)
    with torch.no_grad():
        x_t = nhwc_to_torch(x)
        channel = torch_module.channel.gates(x_t)
        spatial = torch_module.spatial.gates(torch_module.channel(x_t))
    intermediates = state["intermediates"]
    assert intermediates["channel_gates"][0].shape == (2, 32)
    assert intermediates["attention"][0].dtype == jnp.float32
    assert_close(intermediates["channel_gates"][0], channel.numpy())
    assert_close(intermediates["attention"][0], spatial.numpy())


@pytest.mark.parametrize("kind", MODULES)
def test_training_mode_matches_torch_and_updates_statistics(kind):
    module, variables, torch_module = _pair(kind, 5)
    x = random_nhwc(SHAPE, 6)
    out, state = _run(module, variables, x, train=True, mutable=["batch_stats"])
    assert_close(out, torch_to_nhwc(torch_module.train()(nhwc_to_torch(x))))
    assert_close(state["batch_stats"]["spatial"]["bn"]["mean"],
                 torch_module.spatial.conv.bn.running_mean.numpy())


@pytest.mark.parametrize("kind", MODULES)
def test_in_a_resnet_block_attention_slot(kind):
    block = BasicBlock(32, attention=functools.partial(MODULES[kind][0], rd_ratio=1 / 8))
    x = jnp.asarray(random_nhwc(SHAPE))
    variables = jax.eval_shape(block.init, jax.random.key(0), x)  # shapes only: fast
    assert set(variables["params"]["se"]) == {"fc1", "fc2", "spatial"}
    assert jax.eval_shape(block.apply, variables, x).shape == SHAPE
    keys = {r.key for r in rules_for(block.clone(use_downsample=False)).values()}
    assert {"se.channel.fc1.weight", "se.spatial.conv.conv.weight",
            "se.spatial.conv.bn.running_var"} <= keys


# --- transformations, gradients, dtypes -----------------------------------------------------------


def test_jit_vmap_and_grad():
    module, variables, _ = _pair("cbam", 7)
    x = jnp.asarray(random_nhwc(SHAPE, 8))
    eager = module.apply(variables, x)
    chex.assert_trees_all_close(jax.jit(module.apply)(variables, x), eager, atol=1e-6)

    xs = jnp.asarray(random_nhwc((3, 2, 4, 5, 6), 9))
    conv = lambda p: p.sum(-1, keepdims=True)  # noqa: E731
    op = lambda x: F.cbam(x, jnp.tanh, conv)[0]  # noqa: E731
    looped = np.stack([jax.jit(op)(a) for a in xs])
    chex.assert_trees_all_close(jax.jit(jax.vmap(op))(xs), looped, atol=1e-6)

    loss = lambda p: jnp.sum(module.apply({**variables, "params": p}, x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["spatial"]["conv"]["kernel"]).max()) > 0


@pytest.mark.parametrize("kind", MODULES)
def test_bfloat16_is_finite_and_close(kind):
    module, variables, _ = _pair(kind, 10)
    check_bfloat16_close(module, random_nhwc(SHAPE, 11), variables, rtol=3e-2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(8, 9, 32\)"):
        jax.eval_shape(CbamModule().init, jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(2, 32\)"):
        F.cbam_channel_gates(x[:, 0, 0], jnp.tanh)
    with pytest.raises(ValueError, match=r"x and gates must agree.*gates \(2, 9, 8\)"):
        F.spatial_excite(x, jnp.zeros((2, 9, 8)))
    with pytest.raises(ValueError, match=r"spatial_conv output must have rank 4.*\(2, 8, 9\)"):
        F.cbam(x, jnp.tanh, lambda p: p[..., 0])
    with pytest.raises(ValueError, match=r"x and gates must agree in batch and spatial"):
        jax.eval_shape(CbamModule(spatial_kernel_size=4).init, jax.random.key(0), x)  # H - 1
    with pytest.raises(ValueError, match=r"x must not be empty.*\(2, 0, 9, 32\)"):
        F.cbam_channel_gates(x[:, :0], jnp.tanh)  # no position to pool
    with pytest.raises(ValueError, match=r"x must not be empty.*\(2, 8, 9, 0\)"):
        F.cbam_spatial_pool(x[..., :0])  # no channel to pool


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.CbamModule(32))
    with pytest.raises(ValueError, match=r"misshaped keys.*spatial\.conv\.conv\.weight"):
        from_torch(LightCbamModule(), sd)  # the light spatial conv has one input channel
    with pytest.raises(ValueError, match=r"missing keys \['channel\.fc1\.bias', 'channel\.fc2"):
        from_torch(CbamModule(mlp_bias=True), sd)
    with pytest.raises(ValueError, match=r"misshaped keys.*channel\.fc1\.weight"):
        from_torch(CbamModule(rd_channels=4), sd)
