"""`layers.BatchNorm` (built by `layers.batch_norm`) against torch's `BatchNorm2d`."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention import layers
from tests.helpers import assert_close, nhwc_to_torch, random_nhwc, torch_to_nhwc

C = 5


def _torch_bn(seed: int = 0) -> torch.nn.BatchNorm2d:
    """A `BatchNorm2d(C)` with random affine parameters and running statistics."""
    bn = torch.nn.BatchNorm2d(C)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C, generator=gen))
        bn.bias.copy_(torch.randn(C, generator=gen))
        bn.running_mean.copy_(torch.randn(C, generator=gen))
        bn.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    return bn


def _variables(bn: torch.nn.BatchNorm2d) -> dict:
    """The Flax variables of a torch `BatchNorm2d` (copies: torch updates its buffers in place)."""
    get = lambda t: jnp.asarray(t.detach().numpy().copy())  # noqa: E731
    return {"params": {"scale": get(bn.weight), "bias": get(bn.bias)},
            "batch_stats": {"mean": get(bn.running_mean), "var": get(bn.running_var)}}


def _train_step(module: nn.Module, variables: dict, x: jax.Array, cotangent: jax.Array):
    """(output, d<output, cotangent>/dx, new batch_stats) of one training call."""
    def loss(x):
        y, state = module.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(y * cotangent), (y, state["batch_stats"])

    grad, (y, stats) = jax.grad(loss, has_aux=True)(x)
    return y, grad, stats


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_training_matches_torch_batchnorm2d_over_two_steps(offset):
    # Mean 1000, std 10: float32's one-pass E[x^2] - E[x]^2 loses about 1e-3 of the variance.
    bn, module = _torch_bn(), layers.batch_norm(True, None, jnp.float32)
    variables = _variables(bn)
    bn.train()
    for step in range(2):
        x = offset + 10 * random_nhwc((3, 4, 6, C), seed=step)
        cotangent = random_nhwc(x.shape, seed=10 + step)
        y, grad, stats = _train_step(module, variables, jnp.asarray(x), jnp.asarray(cotangent))
        xt = nhwc_to_torch(x).requires_grad_(True)
        yt = bn(xt)
        yt.backward(nhwc_to_torch(cotangent))
        assert_close(y, torch_to_nhwc(yt))
        assert_close(grad, torch_to_nhwc(xt.grad))
        assert_close(stats["mean"], bn.running_mean.numpy())
        assert_close(stats["var"], bn.running_var.numpy())
        variables = {**variables, "batch_stats": stats}
    if offset:  # the test can tell: Flax's own BatchNorm (one-pass, biased) does not match
        flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
        _, flax_grad, _ = _train_step(flax_bn, _variables(_torch_bn()), jnp.asarray(x),
                                      jnp.asarray(cotangent))
        with pytest.raises(AssertionError):
            assert_close(flax_grad, torch_to_nhwc(xt.grad))


def test_running_statistics_by_hand():
    # One channel holding 0 and 2: mean 1, biased variance 1 (normalises), unbiased 2 (stored).
    x = jnp.array([[0.0], [2.0]])
    module = layers.batch_norm(True, None, jnp.float32)
    variables = module.init(jax.random.key(0), x)
    y, state = module.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y[:, 0], [-1 / np.sqrt(1 + 1e-5), 1 / np.sqrt(1 + 1e-5)],
                               rtol=1e-6)
    np.testing.assert_allclose(state["batch_stats"]["mean"], [0.1], rtol=1e-6)
    np.testing.assert_allclose(state["batch_stats"]["var"], [0.9 + 0.1 * 2], rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 1, C), (1, C)])
def test_a_single_value_per_channel_is_refused_in_training(shape):
    module = layers.batch_norm(True, None, jnp.float32)
    variables = _variables(_torch_bn())
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training, got "
                                         rf"shape \({shape[0]}, "):
        module.apply(variables, jnp.ones(shape), mutable=["batch_stats"])
    # `init` (its input only gives the shapes, the statistics stay) and evaluation take it.
    init = module.init(jax.random.key(0), jnp.ones(shape))
    chex.assert_trees_all_equal(init["batch_stats"], {"mean": jnp.zeros(C), "var": jnp.ones(C)})
    eval_module = layers.batch_norm(False, None, jnp.float32)
    assert eval_module.apply(variables, jnp.ones(shape)).shape == shape


def test_init_leaves_statistics_and_eval_is_flax_batchnorm():
    x = jnp.asarray(1000 + random_nhwc((2, 3, 4, C)))
    variables = layers.batch_norm(True, None, jnp.float32).init(jax.random.key(0), x)
    chex.assert_trees_all_equal(variables, {
        "params": {"scale": jnp.ones(C), "bias": jnp.zeros(C)},
        "batch_stats": {"mean": jnp.zeros(C), "var": jnp.ones(C)}})
    bn = _torch_bn()
    variables = _variables(bn)
    module = layers.batch_norm(False, None, jnp.float32)
    flax_bn = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)
    chex.assert_trees_all_equal(module.apply(variables, x), flax_bn.apply(variables, x))
    with torch.no_grad():
        assert_close(module.apply(variables, x), torch_to_nhwc(bn.eval()(nhwc_to_torch(x))))


def test_bfloat16_computes_statistics_in_float32_and_keeps_dtypes():
    x = jnp.asarray(100 + random_nhwc((2, 3, 4, C))).astype(jnp.bfloat16)
    module = layers.batch_norm(True, jnp.bfloat16, jnp.float32)
    variables = module.init(jax.random.key(0), x)
    y, state = module.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((variables, state)))
    _, want = layers.batch_norm(True, None, jnp.float32).apply(
        variables, x.astype(jnp.float32), mutable=["batch_stats"])
    chex.assert_trees_all_close(state, want, rtol=1e-6)


def test_callers_keywords_reach_the_module():
    # non_local's `W_1`: zero scale and bias make the norm output zero.
    zeros = nn.initializers.zeros
    module = layers.batch_norm(True, None, jnp.float32, scale_init=zeros, bias_init=zeros)
    x = jnp.asarray(random_nhwc((2, 3, 3, C)))
    variables = module.init(jax.random.key(0), x)
    y, _ = module.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_equal(y, jnp.zeros_like(x))


def test_axis_name_and_mask_count_every_reduced_value():
    # Two shards under a named axis, or a mask, give the statistics of the values they cover.
    x = jnp.asarray(random_nhwc((4, 3, 2, C)))
    whole = layers.batch_norm(True, None, jnp.float32)
    variables = _variables(_torch_bn())
    _, want = whole.apply(variables, x, mutable=["batch_stats"])
    sharded = layers.batch_norm(True, None, jnp.float32, axis_name="shards")
    _, got = jax.vmap(lambda s: sharded.apply(variables, s, mutable=["batch_stats"]),
                      axis_name="shards")(x.reshape(2, 2, 3, 2, C))
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], got), want, rtol=1e-6)
    padded = jnp.concatenate([x, jnp.full((2, 3, 2, C), 1e3)])
    mask = jnp.arange(6)[:, None, None, None] < 4
    _, masked = whole.apply(variables, padded, mask=mask, mutable=["batch_stats"])
    chex.assert_trees_all_close(masked, want, rtol=1e-6)


def test_global_average_pool_accumulates_in_at_least_float32():
    """The classifiers' head pool: float64 stays float64 (it was summed in float32), and a
    bfloat16 map of 4096 positions is summed in float32 (bfloat16 sums stall at 256 ones)."""
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 3)) * 1e-9 + 1.0)
        pooled = layers.global_average_pool(x64)
        assert pooled.dtype == jnp.float64
        np.testing.assert_allclose(pooled, np.asarray(x64).mean(axis=(1, 2)), rtol=1e-15)
    ones = jnp.ones((1, 64, 64, 2), jnp.bfloat16)
    pooled = layers.global_average_pool(ones)
    assert pooled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(pooled, np.float32), 1.0)
