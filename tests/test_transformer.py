"""Multi-head attention, the DETR Transformer and its position embeddings against PyTorch."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention.functional import _xla_attention
from flax_attention.functional.attention import (
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
    learned_position_embedding,
    sine_position_embedding,
)
from flax_attention.interop.torch import from_torch
from flax_attention.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from flax_attention.transformer import (
    MultiHeadAttention,
    Transformer,
    TransformerDecoder,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import transformer as ref

D, HEADS, FFN = 32, 4, 64
B, T, S = 2, 3, 5
_DROPOUT_KEY = jax.random.key(1, impl="rbg")  # compiles much faster on CPU than threefry


def _qkv(t=T, s=S, n=2, d=4, dtype=np.float32):
    return (random_nhwc((B, t, n, d), 1, dtype), random_nhwc((B, s, n, d), 2, dtype),
            random_nhwc((B, s, n, d), 3, dtype))


def _seq_to_torch(x) -> torch.Tensor:
    """Our `[B, L, C]` -> torch's `[L, B, C]`."""
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(np.asarray(x, np.float32), 0, 1)))


def _seq_from_torch(t: torch.Tensor) -> np.ndarray:
    return np.swapaxes(t.detach().numpy(), 0, 1)


def _padding_mask(b=B, s=S) -> np.ndarray:
    """True = padded: the last two keys of the second batch element."""
    mask = np.zeros((b, s), bool)
    mask[1, -2:] = True
    return mask


# --- Functional attention ------------------------------------------------------------------------


def test_one_hot_keys_pick_values():
    k = 100.0 * jnp.eye(3)[None, :, None, :]  # [1, S=3, N=1, D=3]
    v = jnp.arange(9.0).reshape(1, 3, 1, 3)
    q = 100.0 * jnp.eye(3)[None, ::-1, None, :]  # query t matches key 2 - t
    out = dot_product_attention(q, k, v)
    chex.assert_trees_all_close(out, v[:, ::-1], atol=1e-6)


def test_equal_keys_average_values_and_masked_rows_average_all():
    q, k, v = _qkv()
    out = dot_product_attention(q, np.ones_like(k), v)
    chex.assert_trees_all_close(out, np.broadcast_to(v.mean(1, keepdims=True), out.shape),
                                atol=1e-5)
    nothing = np.zeros((B, 1, T, S), bool)
    minus_inf = np.full((B, 1, T, S), -np.inf, np.float32)
    for out in (dot_product_attention(q, k, v, mask=nothing),
                dot_product_attention(q, k, v, bias=minus_inf)):
        chex.assert_tree_all_finite(out)
        chex.assert_trees_all_close(out, np.broadcast_to(v.mean(1, keepdims=True), out.shape),
                                    atol=1e-5)


def _numpy_attention(q, k, v, mask, bias):
    logits = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1]) + bias
    logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", w, v), w


def test_attention_with_mask_and_bias_matches_numpy():
    q, k, v = _qkv()
    mask = ~_padding_mask()[:, None, None, :]
    bias = random_nhwc((1, 2, T, S), 4)
    expected, weights = _numpy_attention(q, k, v, mask, bias)
    assert_close(dot_product_attention(q, k, v, mask, bias), expected)
    assert_close(dot_product_attention_weights(q, k, mask, bias), weights)
    assert weights[1, :, :, -2:].max() == 0


def test_attention_grads():
    with jax.enable_x64(True):
        q, k, v = (a.astype(np.float64) for a in _qkv(t=2, s=3, n=1, d=2))
        mask = np.array([True, True, False])[None, None, None]
        bias = random_nhwc((B, 1, 2, 3), 5).astype(np.float64)
        # jax.nn.dot_product_attention takes its softmax in float32 even here
        check_grads(jax.jit(lambda *a: dot_product_attention(*a, mask, bias)), (q, k, v), order=1,
                    modes=["rev"], eps=1e-3, atol=1e-3, rtol=1e-3)
        check_grads(jax.jit(lambda q, k: dot_product_attention_weights(q, k, mask, bias)),
                    (q, k), order=1, modes=["rev"])


def _autodiff_attention(q, k, v, mask, bias):
    """The plain math, differentiated by JAX (no custom VJP): the backward pass's reference."""
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1]) + bias
    logits = jnp.where(mask, logits, -1e30)
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)


def _value_and_grads(fn, q, k, v, mask, bias, d_out):
    """The loss `sum(fn(...) * d_out)` and its gradients w.r.t. q, k, v and bias."""
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a[:3], mask, a[3]) * d_out),
                                      argnums=(0, 1, 2, 3)))(q, k, v, bias)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_attention_backward_matches_float64_autodiff(dtype, rtol):
    """The hand-written backward pass against autodiff of the plain math in float64: values and
    gradients of q, k, v and a broadcast bias, with padded keys and a fully masked query row
    (whose gradients w.r.t. q must be exactly zero and finite everywhere)."""
    q, k, v = _qkv(t=4, s=6, n=2, d=3)
    mask = np.ones((B, 1, 4, 6), bool)
    mask[1, :, :, -2:] = False  # padded keys
    mask[0, :, 2, :] = False  # query 2 of batch 0 sees nothing: uniform weights
    bias = random_nhwc((1, 2, 4, 6), 6)
    d_out = random_nhwc((B, 4, 2, 3), 7)
    with jax.enable_x64(True):
        expected = _value_and_grads(_autodiff_attention,
                                    *(a.astype(np.float64) for a in (q, k, v)), mask,
                                    bias.astype(np.float64), d_out.astype(np.float64))
        got = _value_and_grads(dot_product_attention, *(a.astype(dtype) for a in (q, k, v)),
                               mask, bias.astype(dtype), d_out.astype(dtype))
    chex.assert_tree_all_finite(got)
    assert got[1][0].dtype == dtype and got[1][3].shape == bias.shape
    assert_close(got[0], expected[0], rtol)
    for actual, wanted in zip(got[1], expected[1], strict=True):
        assert_close(actual, wanted, rtol)
    assert not np.asarray(got[1][0])[0, 2].any()  # the fully masked query gets no gradient


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_blocked_attention_matches_float64_autodiff(dtype, rtol, monkeypatch):
    """Queries beyond one block go block by block (here 40 in 3 blocks of 14, the last padded):
    values and gradients of q, k, v against autodiff of the plain math in float64, with padded
    keys and a batch element whose keys are all masked (uniform weights, no gradient)."""
    monkeypatch.setattr(_xla_attention, "BLOCK_ELEMENTS", B * 2 * 6 * 16)  # <= 16 queries
    monkeypatch.setattr(_xla_attention, "_attention", None)  # the whole-map path must not run
    q, k, v = _qkv(t=40, s=6, n=2, d=3)
    mask = np.ones((B, 1, 1, 6), bool)
    mask[0] = False  # batch element 0 sees nothing
    mask[1, ..., -2:] = False  # padded keys
    d_out = random_nhwc((B, 40, 2, 3), 7)

    def value_and_grads(fn, *qkv):
        loss = lambda *a: jnp.sum(fn(*a, mask) * d_out.astype(qkv[0].dtype))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*qkv)

    with jax.enable_x64(True):
        expected = value_and_grads(lambda *a: _autodiff_attention(*a, 0.0),
                                   *(a.astype(np.float64) for a in (q, k, v)))
        got = value_and_grads(dot_product_attention, *(a.astype(dtype) for a in (q, k, v)))
    chex.assert_tree_all_finite(got)
    assert got[1][0].dtype == dtype
    assert_close(got[0], expected[0], rtol)
    for actual, wanted in zip(got[1], expected[1], strict=True):
        assert_close(actual, wanted, rtol)
    assert not np.asarray(got[1][0])[0].any()  # the blind batch element gets no gradient
    low = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), mask)
    assert_close(low.astype(jnp.float32), dot_product_attention(q, k, v, mask), rtol=3e-2)


def test_attention_jit_vmap_bf16():
    q, k, v = _qkv()
    eager = dot_product_attention(q, k, v)
    assert_close(jax.jit(dot_product_attention)(q, k, v), eager)
    batched = jax.vmap(dot_product_attention)(*(np.stack([a, 2 * a]) for a in (q, k, v)))
    assert_close(batched[0], eager)
    low = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert low.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(low)
    assert_close(low.astype(jnp.float32), eager, rtol=3e-2)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v: (q[..., :3], k, v, {}), r"q and k must agree.*\(2, 3, 2, 3\)"),
        (lambda q, k, v: (q, k, v[:, :4], {}), r"k and v must agree in shape"),
        (lambda q, k, v: (q[0], k, v, {}), r"q must have rank 4"),
        (lambda q, k, v: (q, k, v.astype(np.float16), {}), r"share one dtype.*float16"),
        (lambda q, k, v: (q, k, v, {"mask": np.ones((B, 1, T, 4), bool)}),
         r"mask must broadcast to \[B, N, T, S\] = \(2, 2, 3, 5\), got shape \(2, 1, 3, 4\)"),
        (lambda q, k, v: (q, k, v, {"mask": np.ones((B, 1, T, S))}), r"mask must be boolean"),
        (lambda q, k, v: (q, k, v, {"bias": np.ones((T, S))}), r"bias must have rank 4"),
        (lambda q, k, v: (q, k, v, {"implementation": "pallas"}), r"implementation must be"),
    ],
)
def test_attention_bad_input(change, match):
    q, k, v, kwargs = change(*_qkv())
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **kwargs)


# --- MultiHeadAttention against torch.nn.MultiheadAttention --------------------------------------


def _mha_pair(seed=0):
    torch_mha = randomize_(torch.nn.MultiheadAttention(D, HEADS), seed)
    module = MultiHeadAttention(HEADS)
    return torch_mha, module, from_torch(module, state_dict(torch_mha))


def _mha_inputs():
    return (random_nhwc((B, T, D), 10), random_nhwc((B, S, D), 11), random_nhwc((B, S, D), 12),
            random_nhwc((B, T, D), 13), random_nhwc((B, S, D), 14))


_BOOL_ATTEND = np.random.default_rng(0).random((T, S)) > 0.3
_BOOL_ATTEND[:, 0] = True  # no row fully masked: torch would give NaN
_FLOAT_MASK = np.where(_BOOL_ATTEND, 0.0, -np.inf).astype(np.float32) + random_nhwc((T, S), 7)
_HEAD_MASK = np.random.default_rng(1).random((B, HEADS, T, S)) > 0.3
_HEAD_MASK[..., 0] = True
# (our key_padding_mask, our attn_mask, torch's attn_mask)
_MASK_CASES = {
    "none": (None, None, None),
    "padding": (_padding_mask(), None, None),
    "bool": (None, _BOOL_ATTEND, ~_BOOL_ATTEND),
    "float": (None, _FLOAT_MASK, _FLOAT_MASK),
    "padding+bool": (_padding_mask(), _BOOL_ATTEND, ~_BOOL_ATTEND),
    "per-head": (_padding_mask(), _HEAD_MASK, ~_HEAD_MASK.reshape(B * HEADS, T, S)),
}


@pytest.mark.parametrize("case", list(_MASK_CASES))
def test_mha_matches_torch(case):
    padding, attn_mask, torch_mask = _MASK_CASES[case]
    torch_mha, module, variables = _mha_pair()
    query, key, value, query_pos, key_pos = _mha_inputs()
    out = module.apply(variables, query, key, value, query_pos, key_pos, padding, attn_mask)
    with torch.no_grad():
        expected, weights = torch_mha(
            _seq_to_torch(query + query_pos), _seq_to_torch(key + key_pos), _seq_to_torch(value),
            key_padding_mask=None if padding is None else torch.from_numpy(padding),
            attn_mask=None if torch_mask is None else torch.from_numpy(torch_mask),
            average_attn_weights=False)
    assert_close(out, _seq_from_torch(expected))
    _, state = module.apply(variables, query, key, value, query_pos, key_pos, padding, attn_mask,
                            mutable=["intermediates"])
    assert_close(state["intermediates"]["attention"][0], weights.numpy())


def test_mha_fully_masked_rows_average_the_values():
    _, module, variables = _mha_pair()
    query, key, value, *_ = _mha_inputs()
    params = variables["params"]
    w_v, b_v = params["in_proj_kernel"][:, 2 * D:], params["in_proj_bias"][2 * D:]
    mean_v = (value @ w_v + b_v).mean(1, keepdims=True)
    expected = mean_v @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]
    no_row = np.zeros((T, S), bool)
    for kwargs in ({"key_padding_mask": np.ones((B, S), bool)}, {"attn_mask": no_row},
                   {"attn_mask": np.full((T, S), -np.inf, np.float32)}):
        out = module.apply(variables, query, key, value, **kwargs)
        chex.assert_tree_all_finite(out)
        assert_close(out, np.broadcast_to(expected, out.shape))


def test_mha_dropout_jit_vmap_bf16():
    _, module, variables = _mha_pair()
    inputs = _mha_inputs()[:3]
    eager = module.apply(variables, *inputs)
    assert_close(jax.jit(module.apply)(variables, *inputs), eager)
    batched = jax.vmap(module.apply, in_axes=(None, 0, 0, 0))(
        variables, *(np.stack([a, -a]) for a in inputs))
    assert_close(batched[0], eager)
    dropping = MultiHeadAttention(HEADS, dropout=0.5)
    assert_close(dropping.apply(variables, *inputs), eager)  # deterministic by default
    rngs = {"dropout": _DROPOUT_KEY}
    dropped = dropping.apply(variables, *inputs, deterministic=False, rngs=rngs)
    assert not np.allclose(dropped, eager)
    assert_close(dropping.apply(variables, *inputs, deterministic=False, rngs=rngs), dropped)
    low = MultiHeadAttention(HEADS, dtype=jnp.bfloat16).apply(variables, *inputs)
    assert low.dtype == jnp.bfloat16
    assert_close(low.astype(jnp.float32), eager, rtol=3e-2)


def test_mha_init_is_xavier():
    params = MultiHeadAttention(HEADS).init(jax.random.key(0), *_mha_inputs()[:3])["params"]
    kernel = params["in_proj_kernel"]
    assert kernel.shape == (D, 3 * D)
    bound = math.sqrt(6 / (D + 3 * D))
    assert bound * 0.9 < np.abs(kernel).max() <= bound
    assert not params["in_proj_bias"].any()


@pytest.mark.parametrize(
    "heads, kwargs, match",
    [
        (5, {}, r"channels \(32\) must be divisible by num_heads \(5\)"),
        (HEADS, {"key_padding_mask": np.zeros((B, T), bool)},
         r"key_padding_mask must be boolean \[B, S\] = \(2, 5\), got shape \(2, 3\)"),
        (HEADS, {"attn_mask": np.zeros((S, T), bool)},
         r"attn_mask must be \[T, S\] = \(3, 5\).*got shape \(5, 3\)"),
        (HEADS, {"attn_mask": np.zeros((B, T, S), bool)}, r"attn_mask.*got shape \(2, 3, 5\)"),
        (HEADS, {"query_pos": np.zeros((B, S, D))}, r"query_pos and query must agree in shape"),
    ],
)
def test_mha_bad_input(heads, kwargs, match):
    query, key, value, *_ = _mha_inputs()
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(heads).init(jax.random.key(0), query, key, value, **kwargs)


def test_mha_query_key_channel_mismatch():
    query, key, value, *_ = _mha_inputs()
    with pytest.raises(ValueError, match=r"query and key must agree.*\(2, 3, 16\).*\(2, 5, 32\)"):
        MultiHeadAttention(HEADS).init(jax.random.key(0), query[..., :16], key, value)


# --- The DETR Transformer ------------------------------------------------------------------------

MAP = (B, 3, 5)  # batch, height, width
QUERIES = 7


def _image_mask() -> np.ndarray:
    """True = padded: the second image is 2 x 3 inside the 3 x 5 map."""
    mask = np.zeros(MAP, bool)
    mask[1, 2:, :] = mask[1, :, 3:] = True
    return mask


@pytest.mark.parametrize(
    "normalize_before, intermediate, padded",
    [(False, False, False), (False, True, True), (True, True, True)],
)
def test_transformer_matches_detr(normalize_before, intermediate, padded):
    kwargs = dict(d_model=D, nhead=HEADS, num_encoder_layers=2, num_decoder_layers=2,
                  dim_feedforward=FFN, normalize_before=normalize_before,
                  return_intermediate_dec=intermediate)
    torch_model = randomize_(ref.Transformer(**kwargs), seed=3, scale=0.3)
    module = Transformer(**kwargs)
    variables = from_torch(module, state_dict(torch_model))
    src, pos = random_nhwc((*MAP, D), 20), random_nhwc((*MAP, D), 21)
    query = random_nhwc((QUERIES, D), 22)
    mask = _image_mask() if padded else None
    hs, memory = jax.jit(module.apply)(variables, src, mask, query, pos)
    with torch.no_grad():
        hs_t, memory_t = torch_model(nhwc_to_torch(src),
                                     None if mask is None else torch.from_numpy(mask),
                                     torch.from_numpy(query), nhwc_to_torch(pos))
    assert hs.shape == (2 if intermediate else 1, B, QUERIES, D)
    assert_close(hs, hs_t.numpy())
    assert_close(memory, torch_to_nhwc(memory_t))


@pytest.mark.parametrize(("activation", "offset"), [("gelu", 0.0), ("glu", 0.0), ("relu", 3e2)])
def test_encoder_layer_activations(activation, offset):
    # offset: norm1's input near 300 (spread 1), where a one-pass variance loses digits.
    torch_layer = randomize_(ref.EncoderLayer(D, HEADS, FFN, activation=activation), seed=4)
    with torch.no_grad():
        torch_layer.self_attn.out_proj.bias += offset
    module = TransformerEncoderLayer(HEADS, FFN, activation=activation)
    variables = from_torch(module, state_dict(torch_layer))
    src, pos = random_nhwc((B, S, D), 30), random_nhwc((B, S, D), 31)
    out = module.apply(variables, src, pos, _padding_mask())
    with torch.no_grad():
        expected = torch_layer(_seq_to_torch(src), torch.from_numpy(_padding_mask()),
                               _seq_to_torch(pos))
    assert_close(out, _seq_from_torch(expected))


def test_stacks_match_detr():
    layer = ref.EncoderLayer(D, HEADS, FFN, normalize_before=True)
    torch_encoder = randomize_(ref.Encoder(layer, 2, torch.nn.LayerNorm(D)), seed=5)
    encoder = TransformerEncoder(HEADS, FFN, normalize_before=True, num_layers=2, final_norm=True)
    torch_decoder = randomize_(ref.Decoder(ref.DecoderLayer(D, HEADS, FFN), 2,
                                           torch.nn.LayerNorm(D), True), seed=6)
    decoder = TransformerDecoder(HEADS, FFN, num_layers=2, return_intermediate=True)
    src, pos = random_nhwc((B, S, D), 40), random_nhwc((B, S, D), 41)
    tgt, query_pos = random_nhwc((B, T, D), 42), random_nhwc((B, T, D), 43)
    memory = encoder.apply(from_torch(encoder, state_dict(torch_encoder)), src, pos)
    hs = decoder.apply(from_torch(decoder, state_dict(torch_decoder)), tgt, memory, pos, query_pos)
    with torch.no_grad():
        memory_t = torch_encoder(_seq_to_torch(src), None, _seq_to_torch(pos))
        hs_t = torch_decoder(_seq_to_torch(tgt), memory_t, None, _seq_to_torch(pos),
                             _seq_to_torch(query_pos))
    assert_close(memory, _seq_from_torch(memory_t))
    assert_close(hs, np.swapaxes(hs_t.numpy(), 1, 2))


def _small_transformer() -> tuple[Transformer, tuple, dict]:
    """A 1 + 1 layer Transformer, its inputs (with padding) and torch-initialised variables."""
    module = Transformer(D, HEADS, 1, 1, FFN)
    inputs = (random_nhwc((*MAP, D), 50), _image_mask(), random_nhwc((QUERIES, D), 51),
              random_nhwc((*MAP, D), 52))
    return module, inputs, from_torch(module, state_dict(ref.Transformer(D, HEADS, 1, 1, FFN)))


def test_transformer_dropout_and_bf16():
    module, inputs, variables = _small_transformer()
    apply = jax.jit(module.apply, static_argnames="deterministic")
    hs, memory = apply(variables, *inputs)
    hs_drop, _ = apply(variables, *inputs, deterministic=False, rngs={"dropout": _DROPOUT_KEY})
    chex.assert_tree_all_finite(hs_drop)
    assert not np.allclose(hs_drop, hs)
    low = module.clone(dtype=jnp.bfloat16)
    hs_low, memory_low = jax.jit(low.apply)(variables, *inputs)
    assert hs_low.dtype == jnp.bfloat16
    assert_close(hs_low.astype(jnp.float32), hs, rtol=5e-2)
    assert_close(memory_low.astype(jnp.float32), memory, rtol=5e-2)


@pytest.mark.parametrize(
    "module_kwargs, change, match",
    [
        ({"nhead": 5}, lambda s, m, q, p: (s, m, q, p), r"d_model \(32\) must be divisible"),
        ({}, lambda s, m, q, p: (s, m[:, :2], q, p),
         r"mask must be boolean \[B, H, W\] = \(2, 3, 5\), got shape \(2, 2, 5\)"),
        ({}, lambda s, m, q, p: (s[..., :16], m, q, p), r"d_model = 32 channels.*\(2, 3, 5, 16\)"),
        ({}, lambda s, m, q, p: (s, m, q[:, :16], p), r"query_embed and src must agree"),
        ({}, lambda s, m, q, p: (s, m, q, p[:, :2]), r"pos_embed and src must agree in shape"),
        ({"activation": "tanh"}, lambda *a: a, r"activation must be one of"),
    ],
)
def test_transformer_bad_input(module_kwargs, change, match):
    module, inputs, _ = _small_transformer()
    module = module.clone(**module_kwargs)
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), *change(*inputs))


# --- Position embeddings --------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sine_embedding_matches_detr(normalize, padded):
    mask = _image_mask() if padded else np.zeros(MAP, bool)
    out = PositionEmbeddingSine(16, normalize=normalize).apply({}, np.zeros((*MAP, 1)),
                                                              mask if padded else None)
    expected = ref.PositionEmbeddingSine(16, normalize=normalize)(torch.from_numpy(mask))
    assert out.shape == (*MAP, 32)
    assert_close(out, torch_to_nhwc(expected))


def test_sine_embedding_by_hand():
    out = sine_position_embedding(np.zeros((1, 3, 4), bool), num_pos_feats=4, temperature=100.0)
    i, j = np.arange(1, 4)[:, None], np.arange(1, 5)[None, :]
    ones = np.ones((3, 4))
    expected = np.stack([np.sin(i * ones), np.cos(i * ones), np.sin(i / 10 * ones),
                         np.cos(i / 10 * ones), np.sin(j * ones), np.cos(j * ones),
                         np.sin(j / 10 * ones), np.cos(j / 10 * ones)], -1)
    assert_close(out[0], expected)
    normalized = sine_position_embedding(np.zeros((1, 2, 2), bool), 2, normalize=True)
    x = np.array([1.0, 2.0]) / (2 + 1e-6) * 2 * np.pi  # the last column is x = 2 pi - eps
    chex.assert_trees_all_close(normalized[0, 0, :, 2], np.sin(x), atol=1e-6)


def test_learned_embedding_matches_detr():
    torch_module = ref.PositionEmbeddingLearned(8)
    module = PositionEmbeddingLearned(8)
    variables = from_torch(module, state_dict(torch_module))
    x = np.zeros((*MAP, 3))
    assert_close(module.apply(variables, x), torch_to_nhwc(torch_module(nhwc_to_torch(x))))
    table = module.init(jax.random.key(0), x)["params"]["row_embed"]
    assert table.shape == (50, 8) and table.min() >= 0 and table.max() < 1
    out = learned_position_embedding(np.eye(3), 2 * np.eye(3), 1, 2, 3)
    chex.assert_trees_all_close(out[0, 1, 2], np.array([0, 0, 2, 0, 1, 0.0]))


def test_position_embeddings_jit_vmap_grads():
    mask = _image_mask()
    eager = sine_position_embedding(mask, 8, normalize=True)
    assert_close(jax.jit(sine_position_embedding, static_argnums=(1, 2, 3))(mask, 8, 1e4, True),
                 eager)
    assert_close(jax.vmap(lambda m: sine_position_embedding(m[None], 8, normalize=True)[0])(mask),
                 eager)
    rows, cols = random_nhwc((4, 3), 60), random_nhwc((5, 3), 61)
    check_grads(lambda r, c: learned_position_embedding(r, c, 2, 3, 4), (rows, cols), order=1,
                modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


def test_combine_masks_by_hand():
    padding = np.array([[False, True]])
    attend = np.array([[True, True], [False, True]])
    mask, bias = combine_masks(padding, attend)
    chex.assert_trees_all_equal(mask, np.array([[[[True, False], [False, False]]]]))
    assert bias is None
    mask, bias = combine_masks(None, attend.astype(np.float32))
    assert mask is None and bias.shape == (1, 1, 2, 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sine_position_embedding(np.zeros((2, 3, 4), bool), scale=1.0),
         r"scale \(1.0\) is only used with normalize=True"),
        (lambda: sine_position_embedding(np.zeros((2, 3, 4), bool), num_pos_feats=5),
         r"num_pos_feats must be a positive even number, got 5"),
        (lambda: sine_position_embedding(np.zeros((3, 4), bool)), r"mask must have rank 3"),
        (lambda: PositionEmbeddingSine().apply({}, np.zeros((*MAP, 1)), np.zeros((2, 3), bool)),
         r"mask must be \[B, H, W\] = \(2, 3, 5\), got shape \(2, 3\)"),
        (lambda: PositionEmbeddingLearned(4).init(jax.random.key(0), np.zeros((1, 51, 2, 1))),
         r"height \(51\) exceeds the 50 entries of row_embed"),
    ],
)
def test_position_embedding_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- from_torch key checks ----------------------------------------------------------------------


def _detr_state(normalize_before=False):
    torch_model = ref.Transformer(D, HEADS, 2, 1, FFN, normalize_before=normalize_before)
    return state_dict(torch_model)


@pytest.mark.parametrize(
    "module, edit, match",
    [
        (Transformer(D, HEADS, 2, 1, FFN), lambda sd: sd.pop("decoder.norm.bias"),
         r"missing keys \['decoder.norm.bias'\]"),
        (Transformer(D, HEADS, 1, 1, FFN), lambda sd: None,
         r"unexpected keys \['encoder.layers.1.linear1.bias'"),
        (Transformer(D, HEADS, 2, 1, FFN), lambda sd: sd.update(
            {"encoder.layers.0.self_attn.in_proj_weight": np.zeros((3 * D, D - 1))}),
         r"misshaped.*encoder.layers.0.self_attn.in_proj_weight: expected \(32, 96\), got "
         r"\(96, 31\)"),
        (Transformer(D, HEADS, 2, 1, 2 * FFN), lambda sd: None,
         r"misshaped.*decoder.layers.0.linear1.weight: expected \(32, 128\), got \(64, 32\)"),
    ],
)
def test_from_torch_key_errors(module, edit, match):
    sd = _detr_state()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        from_torch(module, sd)


def test_from_torch_encoder_norm_only_in_pre_norm():
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.norm.bias', 'encoder.norm"):
        from_torch(Transformer(D, HEADS, 2, 1, FFN), _detr_state(normalize_before=True))
    with pytest.raises(ValueError, match=r"missing keys \['encoder.norm.bias', 'encoder.norm"):
        from_torch(Transformer(D, HEADS, 2, 1, FFN, normalize_before=True), _detr_state())


def test_mha_calls_attention_fn_with_the_one_signature():
    calls = []

    def attention_fn(q, k, v, *, precision, implementation, **masks):
        calls.append((q.shape, k.shape, v.shape, precision, implementation, sorted(masks)))
        return jnp.ones_like(q)

    query, key, value = _mha_inputs()[:3]
    module = MultiHeadAttention(HEADS, attention_fn=attention_fn, implementation="xla",
                                precision=jax.lax.Precision.HIGHEST)
    variables = module.init(jax.random.key(0), query, key, value)
    padding = np.zeros((B, S), bool)
    for kwargs, masks in (({}, []), ({"key_padding_mask": padding}, ["mask"])):
        out = module.apply(variables, query, key, value, **kwargs)
        head = (D // HEADS,)
        assert calls[-1] == ((B, T, HEADS, *head), (B, S, HEADS, *head), (B, S, HEADS, *head),
                             jax.lax.Precision.HIGHEST, "xla", masks)
        out_proj = variables["params"]["out_proj"]
        expected = out_proj["kernel"].sum(0) + out_proj["bias"]
        assert_close(out, np.broadcast_to(expected, (B, T, D)))
