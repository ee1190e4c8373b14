"""Criss-cross attention (CCNet): functional ops, modules and torch interop."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention.criss_cross import CrissCrossAttention, RCCAModule
from flax_attention.functional import criss_cross as criss_cross_ops
from flax_attention.functional.criss_cross import (
    criss_cross_aggregate,
    criss_cross_attention,
    criss_cross_weights,
)
from flax_attention.interop.torch import from_torch
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import criss_cross as ref

SHAPES = [(1, 4, 5), (3, 3, 3), (2, 1, 6), (2, 6, 1), (1, 7, 4)]  # (B, H, W)


def _qkv(b, h, w, c_qk=3, c_v=5, seed=0):
    return (random_nhwc((b, h, w, c_qk), seed), random_nhwc((b, h, w, c_qk), seed + 1),
            random_nhwc((b, h, w, c_v), seed + 2))


def _to_cuda_order(att_h: torch.Tensor, att_w: torch.Tensor) -> np.ndarray:
    """The torch reference's (column `[B,H,W,H]` with self, row `[B,H,W,W]`) -> CUDA order."""
    col, row = att_h.numpy(), att_w.numpy()
    h = col.shape[1]
    keep = ~np.eye(h, dtype=bool)  # [h, g]: g != h
    col = np.stack([col[:, i][..., keep[i]] for i in range(h)], axis=1)
    return np.concatenate([row, col], axis=-1)


def _dense(q, k, v):
    """The same attention with the full HW x HW masked softmax (test-only formula)."""
    b, h, w, c = v.shape
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    allowed = (ii[:, None] == ii[None, :]) | (jj[:, None] == jj[None, :])
    logits = np.einsum("bpc,bsc->bps", q.reshape(b, h * w, -1), k.reshape(b, h * w, -1))
    weights = jax.nn.softmax(np.where(allowed, logits, -np.inf), axis=-1)
    return np.einsum("bps,bsc->bpc", weights, v.reshape(b, h * w, c)).reshape(b, h, w, c)


# --- functional ops ------------------------------------------------------------------------------

# Jitted once per shape: eager dispatch would compile every primitive separately.
attention, weights_of, aggregate = map(
    jax.jit, (criss_cross_attention, criss_cross_weights, criss_cross_aggregate)
)


@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_torch_reference_and_dense_formula(shape):
    q, k, v = _qkv(*shape)
    tq, tk, tv = map(nhwc_to_torch, (q, k, v))
    out = attention(q, k, v)
    assert_close(out, torch_to_nhwc(ref.criss_cross_attention(tq, tk, tv)))
    assert_close(out, _dense(q, k, v))
    weights = weights_of(q, k)
    chex.assert_shape(weights, (*shape, shape[1] + shape[2] - 1))
    assert_close(weights, _to_cuda_order(*ref.criss_cross_weights(tq, tk)))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert float(weights.min()) >= 0.0
    assert_close(aggregate(weights, v), out)


def test_zero_queries_give_uniform_weights():
    q = np.zeros((1, 3, 4, 2), np.float32)
    np.testing.assert_allclose(weights_of(q, q), np.full((1, 3, 4, 6), 1 / 6), rtol=1e-6)


@pytest.mark.parametrize("target", [(1, 2), (0, 3), (2, 0)])
def test_one_hot_key_lands_on_its_cuda_entry(target):
    """A single key aligned with every query: each position that sees it puts ~all weight on
    entry `col` of its row (same row) or `W + (r if r < h else r - 1)` (same column)."""
    height, width, (r, c) = 3, 4, target
    q = np.zeros((1, height, width, 2), np.float32)
    q[..., 0] = 40.0
    k = np.zeros_like(q)
    k[0, r, c, 0] = 1.0
    weights = np.asarray(weights_of(q, k))[0]
    for h in range(height):
        for w in range(width):
            if h == r:
                assert weights[h, w, c] > 0.999
            elif w == c:
                assert weights[h, w, width + (r if r < h else r - 1)] > 0.999
            else:
                np.testing.assert_allclose(weights[h, w], 1 / (height + width - 1), rtol=1e-5)


def test_aggregate_picks_values_by_cuda_order():
    v = random_nhwc((1, 3, 4, 2))
    weights = np.zeros((1, 3, 4, 6), np.float32)
    weights[0, 1, 2, 0] = 1.0  # row entry 0: position (1, 0)
    weights[0, 2, 3, 4] = 1.0  # column entry 0 of (2, 3): row 0, position (0, 3)
    weights[0, 0, 1, 5] = 1.0  # column entry 1 of (0, 1): row 2 (row 0 is itself)
    out = np.asarray(aggregate(weights, v))
    np.testing.assert_allclose(out[0, 1, 2], v[0, 1, 0])
    np.testing.assert_allclose(out[0, 2, 3], v[0, 0, 3])
    np.testing.assert_allclose(out[0, 0, 1], v[0, 2, 1])


def test_gradients_numerically():
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(a, jnp.float64) for a in _qkv(2, 3, 4, seed=3))
        check_grads(attention, (q, k, v), order=1, modes=["rev"])
        check_grads(weights_of, (q, k), order=1, modes=["rev"])
        check_grads(aggregate, (weights_of(q, k), v), order=1, modes=["rev"])


@pytest.mark.parametrize("block_elements", [None, 80])
def test_custom_vjp_matches_autodiff_of_the_unfused_ops(monkeypatch, block_elements):
    """With `block_elements` (80 of v's 200 elements: blocks of 2, 2 and 1 of its 5 channels)
    the differentiated forward pass and the value cotangents go by blocks of channels, as they
    do for large inputs."""
    if block_elements:
        monkeypatch.setattr(criss_cross_ops, "_CHANNEL_BLOCK_ELEMENTS", block_elements)
    q, k, v = _qkv(2, 5, 4)
    cotangent = random_nhwc((2, 5, 4, 5), seed=9)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * cotangent)

    fused = jax.jit(jax.grad(loss(criss_cross_attention), (0, 1, 2)))(q, k, v)
    unfused = jax.jit(jax.grad(loss(lambda q, k, v: criss_cross_aggregate(
        criss_cross_weights(q, k), v)), (0, 1, 2)))(q, k, v)
    for a, b in zip(fused, unfused, strict=True):
        assert_close(a, b, rtol=1e-5)


def test_jit_and_vmap_equal_eager():
    q, k, v = _qkv(3, 4, 5)
    eager = criss_cross_attention(q, k, v)
    assert_close(jax.jit(criss_cross_attention)(q, k, v), eager, rtol=1e-6)
    batched = jax.vmap(criss_cross_attention)(q[:, None], k[:, None], v[:, None])
    assert_close(batched[:, 0], eager, rtol=1e-6)
    w_eager = criss_cross_weights(q, k)
    assert_close(jax.vmap(criss_cross_weights)(q[:, None], k[:, None])[:, 0], w_eager, rtol=1e-6)
    assert_close(jax.jit(criss_cross_aggregate)(w_eager, v), eager, rtol=1e-6)


def test_bfloat16_is_finite_and_close_to_float32():
    q, k, v = _qkv(2, 6, 5, c_qk=8, c_v=4)
    out = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out).all())
    assert_close(out.astype(jnp.float32), attention(q, k, v), rtol=5e-2)
    grads = jax.jit(jax.grad(lambda v: attention(q, k, v).sum()))(v.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.isfinite(grads).all())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((3, 4, 2)), np.zeros((3, 4, 2)), np.zeros((1, 3, 4, 2))), r"q must have rank 4"),
        ((np.zeros((1, 3, 4, 2)), np.zeros((1, 3, 4, 3)), np.zeros((1, 3, 4, 2))),
         r"q and k must agree in shape; got q \(1, 3, 4, 2\), k \(1, 3, 4, 3\)"),
        ((np.zeros((1, 3, 4, 2)), np.zeros((1, 3, 4, 2)), np.zeros((1, 4, 3, 2))),
         r"q and v must agree in batch and spatial.*q \(1, 3, 4, 2\), v \(1, 4, 3, 2\)"),
    ],
)
def test_attention_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        criss_cross_attention(*args)


def test_aggregate_bad_input():
    v = np.zeros((1, 3, 4, 2))
    with pytest.raises(ValueError, match=r"weights' last axis must be H\+W-1.*\(1, 3, 4, 7\)"):
        criss_cross_aggregate(np.zeros((1, 3, 4, 7)), v)
    with pytest.raises(ValueError, match=r"weights and v must agree in batch and spatial"):
        criss_cross_aggregate(np.zeros((2, 3, 4, 6)), v)
    with pytest.raises(ValueError, match=r"k must have rank 4"):
        criss_cross_weights(v, v[0])


# --- modules and interop -------------------------------------------------------------------------


def _load(module, torch_module):
    return from_torch(module, state_dict(torch_module))


def _apply(module, variables, x, **kwargs):
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


@pytest.mark.parametrize(("shape", "reduction"), [((2, 5, 7, 16), 8), ((1, 4, 1, 9), 3),
                                                  ((3, 1, 3, 24), 8),
                                                  ((2, 3, 4, 20), 8)])  # 20 // 8, floored
def test_module_matches_torch_reference(shape, reduction):
    torch_module = randomize_(ref.CrissCrossAttention(shape[-1], reduction))
    x = random_nhwc(shape)
    module = CrissCrossAttention(reduction)
    out = _apply(module, _load(module, torch_module), x)
    with torch.no_grad():
        assert_close(out, torch_to_nhwc(torch_module(nhwc_to_torch(x))))


def test_fresh_module_is_identity_and_sows_weights():
    x = random_nhwc((2, 3, 4, 8))
    module = CrissCrossAttention()
    variables = jax.jit(module.init)(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["gamma"], (1,))
    out, state = _apply(module, variables, x, mutable=["intermediates"])
    np.testing.assert_array_equal(out, x)
    (weights,) = state["intermediates"]["attention"]
    chex.assert_shape(weights, (2, 3, 4, 6))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_module_bfloat16_is_finite_and_close():
    x = random_nhwc((1, 4, 5, 16))
    torch_module = randomize_(ref.CrissCrossAttention(16))
    variables = _load(CrissCrossAttention(), torch_module)
    out = _apply(CrissCrossAttention(dtype=jnp.bfloat16), variables, x)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    assert_close(out.astype(jnp.float32), _apply(CrissCrossAttention(), variables, x), rtol=5e-2)


def test_module_bad_input():
    with pytest.raises(ValueError, match=r"channels of x \(6\) must be at least reduction"):
        CrissCrossAttention().init(jax.random.key(0), np.zeros((1, 3, 3, 6)))
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(3, 3, 16\)"):
        CrissCrossAttention().init(jax.random.key(0), np.zeros((3, 3, 16)))
    with pytest.raises(ValueError, match=r"channels of x \(28\) must be at least 4 \* reduc"):
        RCCAModule().init(jax.random.key(0), np.zeros((1, 3, 3, 28)))


def test_from_torch_reports_missing_extra_and_misshaped_keys():
    weights = state_dict(ref.CrissCrossAttention(16))
    module = CrissCrossAttention()
    with pytest.raises(ValueError, match=r"missing keys \['gamma'\].*unexpected keys \['extra'\]"):
        from_torch(module, {**{k: v for k, v in weights.items() if k != "gamma"}, "extra": 0})
    bad = dict(weights, **{"key_conv.weight": np.zeros((3, 16, 1, 1))})
    with pytest.raises(ValueError, match=r"misshaped.*key_conv.weight: expected \(1, 1, 16, 2\)"):
        from_torch(module, bad)
    rcca = state_dict(ref.RCCAModule(32, 16, num_classes=None))
    with pytest.raises(ValueError, match=r"missing keys \['bottleneck.3.bias', 'bottleneck.3.w"):
        from_torch(RCCAModule(16, num_classes=5), rcca)


@pytest.mark.parametrize(("num_classes", "recurrence"), [(None, 2), (5, 2), (5, 0)])
def test_rcca_module_matches_torch_reference_in_eval_mode(num_classes, recurrence):
    # recurrence 0 (the reference Seg_Model's default): `cca` is loaded and left unused.
    torch_module = randomize_(ref.RCCAModule(32, 16, num_classes, recurrence=recurrence),
                              scale=0.3)
    x = random_nhwc((2, 6, 5, 32))
    module = RCCAModule(16, num_classes, recurrence=recurrence)
    out = _apply(module, _load(module, torch_module), x)
    chex.assert_shape(out, (2, 6, 5, num_classes or 16))
    with torch.no_grad():
        assert_close(out, torch_to_nhwc(torch_module(nhwc_to_torch(x))))


def test_rcca_module_train_mode_matches_torch_batch_statistics():
    torch_module = randomize_(ref.RCCAModule(32, 8, None, recurrence=1, dropout=0.0), scale=0.3)
    x = random_nhwc((2, 4, 3, 32))
    module = RCCAModule(8, None, recurrence=1, dropout=0.0)
    # Copies: from_torch's arrays share memory with the torch tensors (zero-copy on CPU), which
    # the torch forward below updates in place.
    before = {k: v.copy() for k, v in state_dict(torch_module).items()}
    out, state = _apply(module, from_torch(module, before), x, train=True,
                        deterministic=False, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.key(0)})
    expected = torch_module.train()(nhwc_to_torch(x))
    assert_close(out, torch_to_nhwc(expected), rtol=1e-4)
    # Running means and (unbiased) running variances are torch's.
    want = _load(module, torch_module)["batch_stats"]
    chex.assert_trees_all_equal_structs(state["batch_stats"], want)
    jax.tree.map(assert_close, state["batch_stats"], want)


def test_rcca_dropout_drops_whole_channels():
    x = random_nhwc((1, 4, 4, 32))
    module = RCCAModule(16, None, dropout=0.5)
    variables = _load(module, randomize_(ref.RCCAModule(32, 16, None, dropout=0.5)))

    @jax.jit
    def both(variables, x, key):
        dropped = module.apply(variables, x, deterministic=False, rngs={"dropout": key})
        return module.apply(variables, x), dropped

    kept, out = map(np.asarray, both(variables, x, jax.random.key(1)))
    dropped = np.all(out == 0, axis=(1, 2))[0]  # [C]
    assert dropped.any() and not dropped.all()
    np.testing.assert_allclose(out[..., ~dropped], 2 * kept[..., ~dropped], rtol=1e-6)


def test_module_calls_attention_fn_with_the_one_signature():
    calls = []

    def attention_fn(q, k, v, *, precision, implementation):
        calls.append((q.shape, k.shape, v.shape, precision, implementation))
        return jnp.full_like(v, 3.0)

    x = random_nhwc((1, 3, 4, 16))
    module = CrissCrossAttention(attention_fn=attention_fn, implementation="xla",
                                 precision=jax.lax.Precision.HIGHEST)
    params = {**module.init(jax.random.key(0), x)["params"], "gamma": jnp.ones((1,))}
    out = module.apply({"params": params}, x)
    assert calls[-1] == ((1, 3, 4, 2), (1, 3, 4, 2), (1, 3, 4, 16), jax.lax.Precision.HIGHEST,
                         "xla")
    assert_close(out, x + 3.0)


def test_inplace_abn_reads_only_batchnorm_scales_as_absolute_value_plus_eps():
    """CCNet's InPlaceABN normalises with `|weight| + eps`; a LayerNorm's scale or a gamma in
    the same rules is read as it is."""
    from flax_attention.interop.torch import (
        batch_norm,
        inplace_abn,
        inplace_abn_scale,
        layer_norm,
        param,
    )

    rules = inplace_abn(batch_norm(("bn",), "bn") | layer_norm(("ln",), "ln")
                        | param(("gamma",), "gamma"))
    assert rules[("params", "bn", "scale")].transform is inplace_abn_scale
    assert rules[("params", "ln", "scale")].transform is not inplace_abn_scale
    assert rules[("params", "gamma")].transform is not inplace_abn_scale
    weight = np.array([-2.0, 0.0, 0.5], np.float32)
    np.testing.assert_array_equal(inplace_abn_scale(weight), np.array([2.00001, 1e-5, 0.50001],
                                                                      np.float32))
