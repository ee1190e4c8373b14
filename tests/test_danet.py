"""DANet: position/channel attention ops, modules and head against the PyTorch references."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention import layers
from flax_attention.danet import ChannelAttention, DANetHead, PositionAttention
from flax_attention.functional import danet as F
from flax_attention.interop.torch import from_torch
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import danet as ref

# (B, H, W, Cqk, Cv): square, non-square, H = 1, W = 1, batch 1 and 3, odd widths.
PAM_SHAPES = [(1, 4, 4, 3, 5), (3, 3, 5, 2, 7), (2, 1, 6, 4, 4), (2, 6, 1, 1, 3)]
CAM_SHAPES = [(1, 4, 4, 5), (3, 3, 5, 7), (2, 1, 6, 3), (2, 6, 1, 4)]


def _qkv(b, h, w, cqk, cv, seed=0):
    return (random_nhwc((b, h, w, cqk), seed), random_nhwc((b, h, w, cqk), seed + 1),
            random_nhwc((b, h, w, cv), seed + 2))


def _grads(fn):
    """Jitted gradients of a non-linear loss of `fn(q, k, v)` with respect to q, k and v."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))


def _uses_scan(fn, *args) -> bool:
    return "scan" in str(jax.make_jaxpr(fn)(*args))


# --- functional ops -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", PAM_SHAPES)
def test_position_attention_matches_torch(shape):
    q, k, v = _qkv(*shape)
    expected = ref.pam(*(nhwc_to_torch(a) for a in (q, k, v)))
    assert_close(F.position_attention(q, k, v), torch_to_nhwc(expected))


@pytest.mark.parametrize("shape", CAM_SHAPES)
def test_channel_attention_matches_torch(shape):
    x = random_nhwc(shape)
    assert_close(F.channel_attention(x), torch_to_nhwc(ref.cam(nhwc_to_torch(x))))


@pytest.mark.parametrize("chunk_size", [1, 16])
def test_chunked_position_attention_equals_dense(chunk_size):
    q, k, v = _qkv(2, 5, 7, 3, 4)  # 35 positions: no chunk size divides it
    dense = functools.partial(F.position_attention, chunk_size=35)
    chunked = functools.partial(F.position_attention, chunk_size=chunk_size)
    assert not _uses_scan(dense, q, k, v) and _uses_scan(chunked, q, k, v)
    assert_close(jax.jit(chunked)(q, k, v), jax.jit(dense)(q, k, v))
    for got, want in zip(_grads(chunked)(q, k, v), _grads(dense)(q, k, v), strict=True):
        assert_close(got, want)


def test_position_attention_chunks_above_default_chunk_size():
    assert F.DEFAULT_CHUNK_SIZE == 512
    assert not _uses_scan(F.position_attention, *_qkv(1, 16, 32, 1, 2))  # 512 positions: dense
    large = _qkv(1, 19, 27, 1, 2)  # 513 positions: two blocks
    assert _uses_scan(F.position_attention, *large)
    assert_close(F.position_attention(*large), F.position_attention(*large, chunk_size=513))


def test_chunked_position_attention_holds_only_blocks():
    q = jax.ShapeDtypeStruct((1, 32, 64, 2), jnp.float32)  # 2048 positions: a 16 MiB map
    v = jax.ShapeDtypeStruct((1, 32, 64, 3), jnp.float32)
    full_map = 2048 * 2048 * 4

    def temp_bytes(fn) -> int:
        return jax.jit(fn).lower(q, q, v).compile().memory_analysis().temp_size_in_bytes

    chunked = functools.partial(F.position_attention, chunk_size=256)
    assert temp_bytes(functools.partial(F.position_attention, chunk_size=2048)) >= full_map
    assert temp_bytes(chunked) <= full_map // 2
    assert temp_bytes(_grads(chunked)) <= full_map // 2


def test_one_hot_keys_pick_one_value():
    h, w = 2, 3
    keys = np.eye(h * w, dtype=np.float32).reshape(1, h, w, h * w)
    target = np.array([4, 0, 5, 1, 3, 2])  # query i attends to key target[i] only
    queries = 100.0 * np.eye(h * w, dtype=np.float32)[target].reshape(1, h, w, h * w)
    v = random_nhwc((1, h, w, 3))
    expected = v.reshape(h * w, 3)[target].reshape(1, h, w, 3)
    for chunk_size in (None, 4):
        out = F.position_attention(queries, keys, v, chunk_size=chunk_size)
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_zero_queries_average_the_values():
    q, k, v = _qkv(2, 3, 4, 2, 5)
    out = F.position_attention(np.zeros_like(q), k, v)
    expected = np.broadcast_to(v.mean(axis=(1, 2), keepdims=True), v.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 300])
def test_gram_matrix_is_the_float64_product(channels):
    """One block (3 channels) and three (128, 128 and 44): the product in float64, and exactly
    symmetric when built from blocks."""
    xf = random_nhwc((2, 1, 5, channels)).reshape(2, 5, channels)
    gram = np.asarray(F.gram_matrix(jnp.asarray(xf)))
    x64 = xf.astype(np.float64)
    np.testing.assert_allclose(gram, np.einsum("blc,bld->bcd", x64, x64), rtol=1e-5, atol=1e-5)
    if channels > F.GRAM_BLOCK:
        np.testing.assert_array_equal(gram, np.swapaxes(gram, 1, 2))


def test_channel_attention_in_blocks_matches_torch(monkeypatch):
    """Seven channels in Gram blocks of 3, 3 and 1, and twelve positions in backward blocks of
    5 (starting at 0, 5 and 7: the last overlaps): forward, and the backward against torch's
    float64 autograd."""
    monkeypatch.setattr(F, "GRAM_BLOCK", 3)
    monkeypatch.setattr(F, "_POSITION_BLOCK", 5)
    x, d_out = random_nhwc((2, 3, 4, 7), 5), random_nhwc((2, 3, 4, 7), 6)
    x_t = nhwc_to_torch(x).double().requires_grad_(True)
    expected = ref.cam(x_t)
    (expected * nhwc_to_torch(d_out).double()).sum().backward()
    assert_close(F.channel_attention(x), torch_to_nhwc(expected.detach().float()))
    grad = jax.grad(lambda x: jnp.sum(F.channel_attention(x) * d_out))(x)
    assert_close(grad, torch_to_nhwc(x_t.grad), rtol=1e-5)


def test_channel_attention_by_hand():
    # Two positions, two channels, x = identity: energy = I, rowmax - energy = [[0, 1], [1, 0]],
    # so each channel takes 1 / (1 + e) of itself and e / (1 + e) of the other.
    x = np.eye(2, dtype=np.float32).reshape(1, 1, 2, 2)
    a, b = 1 / (1 + np.e), np.e / (1 + np.e)
    np.testing.assert_allclose(F.channel_attention_weights(x)[0], [[a, b], [b, a]], rtol=1e-6)
    np.testing.assert_allclose(F.channel_attention(x)[0, 0], [[a, b], [b, a]], rtol=1e-6)


def test_weights_are_distributions():
    q, k, _ = _qkv(2, 3, 4, 2, 1)
    for att, length in ((F.position_attention_weights(q, k), 12),
                        (F.channel_attention_weights(q), 2)):
        chex.assert_shape(att, (2, length, length))
        np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_position_attention_grads(chunk_size):
    q, k, v = _qkv(1, 3, 4, 2, 3)
    fn = functools.partial(F.position_attention, chunk_size=chunk_size)
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v))
        check_grads(jax.jit(fn), args, order=1, modes=["rev"])


def test_channel_attention_grads():
    x = random_nhwc((2, 3, 2, 3)) * 0.5
    with jax.enable_x64(True):
        check_grads(jax.jit(F.channel_attention), (jnp.asarray(x, jnp.float64),), order=1,
                    modes=["rev"])


@pytest.mark.parametrize("shape", CAM_SHAPES)
def test_channel_attention_backward_matches_torch_float64(shape):
    """The hand-written backward pass, in float32, against torch's autograd of the reference in
    float64, for a random output cotangent."""
    x, d_out = random_nhwc(shape, 3), random_nhwc(shape, 4)
    x_t = nhwc_to_torch(x).double().requires_grad_(True)
    (ref.cam(x_t) * nhwc_to_torch(d_out).double()).sum().backward()
    grad = jax.jit(jax.grad(lambda x: jnp.sum(F.channel_attention(x) * d_out)))(x)
    assert grad.dtype == jnp.float32
    assert_close(grad, torch_to_nhwc(x_t.grad), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_jit_and_vmap_equal_eager(chunk_size):
    q, k, v = _qkv(2, 3, 4, 2, 3)
    pam = functools.partial(F.position_attention, chunk_size=chunk_size)
    eager = pam(q, k, v)
    assert_close(jax.jit(pam)(q, k, v), eager)
    stacked = jax.vmap(pam)(*(np.stack([a, 2 * a]) for a in (q, k, v)))
    assert_close(stacked[0], eager)
    assert_close(stacked[1], pam(2 * q, 2 * k, 2 * v))
    x = np.concatenate([q, v], axis=-1)
    assert_close(jax.jit(F.channel_attention)(x), F.channel_attention(x))
    assert_close(jax.vmap(F.channel_attention)(x[None])[0], F.channel_attention(x))


def test_bfloat16_is_finite_and_close():
    q, k, v = _qkv(2, 5, 7, 4, 6)
    for fn, args in ((F.position_attention, (q, k, v)),
                     (functools.partial(F.position_attention, chunk_size=8), (q, k, v)),
                     (F.channel_attention, (0.3 * v,))):
        low = jax.jit(fn)(*(jnp.asarray(a, jnp.bfloat16) for a in args))
        assert low.dtype == jnp.bfloat16
        assert bool(jnp.isfinite(low).all())
        assert_close(low.astype(jnp.float32), jax.jit(fn)(*args), rtol=3e-2)
    chunked = functools.partial(F.position_attention, chunk_size=8)
    low = _grads(chunked)(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    for got, want in zip(low, _grads(chunked)(q, k, v), strict=True):
        assert got.dtype == jnp.bfloat16 and bool(jnp.isfinite(got).all())
        assert_close(got.astype(jnp.float32), want, rtol=5e-2)


def test_large_energies_stay_finite():
    q, k, v = _qkv(1, 3, 3, 2, 2)
    out = F.position_attention(1e4 * q, 1e4 * k, v)
    assert bool(jnp.isfinite(out).all())
    assert bool(jnp.isfinite(F.channel_attention(1e3 * v)).all())


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((1, 3, 3), (1, 3, 3, 2), (1, 3, 3, 2)), {}, r"q must have rank 4.*\(1, 3, 3\)"),
        (((1, 3, 3, 2), (1, 3, 3, 3), (1, 3, 3, 2)), {}, r"q \(1, 3, 3, 2\), k \(1, 3, 3, 3\)"),
        (((1, 3, 3, 2), (1, 3, 3, 2), (1, 3, 4, 5)), {}, r"q \(1, 3, 3, 2\), v \(1, 3, 4, 5\)"),
        (((2, 3, 3, 2), (2, 3, 3, 2), (1, 3, 3, 5)), {}, r"batch and spatial"),
        (((1, 3, 3, 2), (1, 3, 3, 2), (1, 3, 3, 5)), {"chunk_size": 0}, "chunk_size"),
    ],
)
def test_position_attention_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.position_attention(*(np.zeros(s, np.float32) for s in args), **kwargs)


def test_channel_attention_bad_input():
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(2, 3, 4\)"):
        F.channel_attention(np.zeros((2, 3, 4), np.float32))


# --- modules ------------------------------------------------------------------------------------


def _import(module: nn.Module, torch_module: torch.nn.Module, seed: int = 0) -> dict:
    # Copies: jnp.asarray may alias the numpy views of torch's buffers, which torch's training
    # mode updates in place.
    weights = state_dict(randomize_(torch_module, seed))
    return from_torch(module, {k: v.copy() for k, v in weights.items()})


def _compare_module(module, torch_module, shape, **kwargs):
    variables = _import(module, torch_module)
    x = random_nhwc(shape, seed=3)
    with torch.no_grad():
        expected = torch_module(nhwc_to_torch(x))
    assert_close(module.apply(variables, x, **kwargs), torch_to_nhwc(expected))


@pytest.mark.parametrize("shape", [(1, 4, 4, 16), (3, 3, 5, 24), (2, 1, 6, 8), (2, 6, 1, 8),
                                   (2, 3, 4, 20)])  # 20 // 8: floored, as the reference
def test_position_attention_module_matches_torch(shape):
    _compare_module(PositionAttention(), ref.PositionAttention(shape[-1]), shape)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 4, 3), (3, 4, 1, 5)])
def test_channel_attention_module_matches_torch(shape):
    _compare_module(ChannelAttention(), ref.ChannelAttention(), shape)


@pytest.mark.parametrize("shape", [(2, 5, 6, 64), (1, 4, 1, 32), (1, 3, 4, 44)])  # 44 // 4
def test_head_matches_torch_in_eval_mode(shape):
    head, torch_head = DANetHead(out_channels=3), ref.DANetHead(shape[-1], 3)
    variables = _import(head, torch_head)
    x = random_nhwc(shape, seed=3)
    with torch.no_grad():
        expected = torch_head(nhwc_to_torch(x))
    for got, want in zip(head.apply(variables, x), expected, strict=True):
        assert_close(got, torch_to_nhwc(want))


def test_head_training_step_matches_torch_without_dropout():
    head, torch_head = DANetHead(out_channels=2, dropout=0.0), ref.DANetHead(32, 2, dropout=0.0)
    variables = _import(head, torch_head)
    x = random_nhwc((2, 3, 4, 32), seed=3)
    outs, updates = head.apply(variables, x, train=True, mutable=["batch_stats"])
    expected = torch_head.train()(nhwc_to_torch(x))
    for got, want in zip(outs, expected, strict=True):
        assert_close(got, torch_to_nhwc(want.detach()), rtol=1e-4)
    # Running means and (unbiased) running variances are torch's.
    want = from_torch(head, state_dict(torch_head))["batch_stats"]
    chex.assert_trees_all_equal_structs(updates["batch_stats"], want)
    jax.tree.map(assert_close, updates["batch_stats"], want)


def test_head_dropout_drops_whole_channels():
    head = DANetHead(out_channels=2, dropout=0.5)
    x = random_nhwc((2, 3, 4, 32))
    variables = _import(head, ref.DANetHead(32, 2))
    capture = lambda mdl, _: isinstance(mdl, nn.Dropout | layers.ConvBN)  # noqa: E731
    train = jax.jit(functools.partial(
        head.apply, train=True, deterministic=False, capture_intermediates=capture,
        mutable=["intermediates", "batch_stats"],
    ))
    _, state = train(variables, x, rngs={"dropout": jax.random.key(1)})
    seen = {k: v["__call__"][0] for k, v in state["intermediates"].items() if "__call__" in v}
    sa, sc = seen["conv51"], seen["conv52"]
    # Dropouts in call order: before conv8 (sa + sc), conv6 (sa), conv7 (sc).
    for i, inputs in enumerate((sa + sc, sa, sc)):
        y = seen[f"Dropout_{i}"]
        kept = np.isclose(y, 2 * inputs, rtol=1e-6).all(axis=(1, 2))  # [B, C]
        dropped = (y == 0).all(axis=(1, 2))
        assert (kept | dropped).all() and (kept & ~dropped).any() and (dropped & ~kept).any()
    chex.assert_trees_all_equal(head.apply(variables, x), head.apply(variables, x, train=False))


def test_fresh_modules_are_identity_and_sow_maps():
    x = random_nhwc((2, 3, 4, 16))
    for module, length in ((PositionAttention(), 12), (ChannelAttention(), 16)):
        variables = jax.jit(module.init)(jax.random.key(0), x)
        np.testing.assert_array_equal(variables["params"]["gamma"], [0.0])
        out, state = module.apply(variables, x, mutable=["intermediates"])
        np.testing.assert_allclose(out, x)
        (att,) = state["intermediates"]["attention"]
        chex.assert_shape(att, (2, length, length))
        np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)


def test_position_attention_module_takes_attention_fn():
    x = random_nhwc((1, 5, 7, 16))
    variables = _import(PositionAttention(), ref.PositionAttention(16))
    chunked = PositionAttention(attention_fn=functools.partial(F.position_attention, chunk_size=6))
    assert_close(chunked.apply(variables, x), PositionAttention().apply(variables, x))


def test_modules_jit_and_bfloat16():
    x = random_nhwc((2, 3, 4, 16))
    for module, torch_module in ((PositionAttention(), ref.PositionAttention(16)),
                                 (ChannelAttention(), ref.ChannelAttention())):
        variables = _import(module, torch_module)
        eager = module.apply(variables, x)
        assert_close(jax.jit(module.apply)(variables, x), eager)
        low = module.clone(dtype=jnp.bfloat16).apply(variables, x)
        assert low.dtype == jnp.bfloat16 and bool(jnp.isfinite(low).all())
        assert_close(low.astype(jnp.float32), eager, rtol=3e-2)


def test_modules_bad_input():
    with pytest.raises(ValueError, match=r"x channels \(6\) must be at least reduction \(8\)"):
        PositionAttention().init(jax.random.key(0), np.zeros((1, 2, 2, 6), np.float32))
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(2, 2, 16\)"):
        ChannelAttention().init(jax.random.key(0), np.zeros((2, 2, 16), np.float32))
    with pytest.raises(ValueError, match=r"x channels \(28\) must be at least 4 \* "):
        DANetHead(3).init(jax.random.key(0), np.zeros((1, 2, 2, 28), np.float32))


def test_from_torch_rejects_bad_state_dicts():
    weights = state_dict(ref.PositionAttention(16))
    missing = {k: v for k, v in weights.items() if k != "gamma"}
    with pytest.raises(ValueError, match=r"missing keys \['gamma'\]"):
        from_torch(PositionAttention(), missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        from_torch(PositionAttention(), {**weights, "extra": np.zeros(1)})
    misshaped = {**weights, "key_conv.weight": np.zeros((3, 16, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"key_conv.weight: expected \(1, 1, 16, 2\)"):
        from_torch(PositionAttention(), misshaped)
    head = state_dict(ref.DANetHead(32, 2))
    with pytest.raises(ValueError, match=r"missing keys \['conv6.1.bias'\]"):
        from_torch(DANetHead(2), {k: v for k, v in head.items() if k != "conv6.1.bias"})


def test_position_attention_calls_attention_fn_with_the_one_signature():
    calls = []

    def attention_fn(q, k, v, *, precision, implementation):
        calls.append((q.shape, k.shape, v.shape, precision, implementation))
        return jnp.full_like(v, 3.0)

    x = random_nhwc((1, 3, 4, 16))
    module = PositionAttention(attention_fn=attention_fn, implementation="xla",
                               precision=jax.lax.Precision.HIGHEST)
    params = {**module.init(jax.random.key(0), x)["params"], "gamma": jnp.ones((1,))}
    out = module.apply({"params": params}, x)
    assert calls[-1] == ((1, 3, 4, 2), (1, 3, 4, 2), (1, 3, 4, 16), jax.lax.Precision.HIGHEST,
                         "xla")
    assert_close(out, x + 3.0)
