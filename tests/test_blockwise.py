"""Memory-efficient softmax attention: the blockwise XLA path and the Pallas flash kernel.

The kernel's own tests pass `interpret` to `flash.flash_attention` (interpreted everywhere, and
compiled too on a GPU: the `interpret` fixture) and compare values and `jax.grad` with
`flash.flash_attention_reference`; the tests of `implementation="pallas"` run the Pallas
interpreter on the CPU and compile for the GPU when JAX's default backend is one.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention.danet import PositionAttention
from flax_attention.functional import blockwise as B
from flax_attention.functional.non_local import non_local, non_local_weights
from flax_attention.kernels import flash
from flax_attention.kernels._common import on_gpu
from flax_attention.non_local import NonLocal2D
from tests.helpers import assert_close, random_nhwc

# (B, Lq, Lk, Ck, Cv): Lq = Lk with no block size dividing it, sub-sampled keys (Lk < Lq),
# more keys than queries, Cv wider than one 16-channel kernel tile, Ck = 1.
SHAPES = [(2, 35, 35, 3, 4), (1, 17, 9, 2, 5), (3, 10, 13, 1, 20)]
SCALES = [None, 0.37]
F32, BF16 = jnp.float32, jnp.bfloat16


def _default_and_slow(cases, default) -> list:
    """`cases` as pytest params, those not in `default` marked slow (interpret mode is slow; the
    default ones still cover every shape, dtype and block choice)."""
    return [pytest.param(*case, marks=() if case in default else pytest.mark.slow)
            for case in cases]


def _qkv(b, lq, lk, ck, cv, seed=0, dtype=np.float32):
    return (random_nhwc((b, lq, ck), seed, dtype), random_nhwc((b, lk, ck), seed + 1, dtype),
            random_nhwc((b, lk, cv), seed + 2, dtype))


def _grads(fn):
    """Jitted gradients of a non-linear loss of `fn(q, k, v)` with respect to q, k and v."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))),
                            argnums=(0, 1, 2)))


def _jaxpr(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def _assert_trees_close(got, want, rtol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and bool(jnp.isfinite(g).all())
        assert_close(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol)


def _torch_attention(q, k, v, scale):
    q, k, v = (torch.from_numpy(np.asarray(a)) for a in (q, k, v))
    logits = q @ k.transpose(1, 2) * (1.0 if scale is None else scale)
    return (torch.softmax(logits, dim=-1) @ v).numpy()


# --- the blockwise XLA path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "scale"),
    _default_and_slow(itertools.product(SHAPES, SCALES),
                      [(SHAPES[0], None), (SHAPES[1], 0.37), (SHAPES[2], 0.37)]),
)
def test_chunked_equals_dense_and_torch(shape, scale):
    q, k, v = _qkv(*shape)
    dense = functools.partial(B.blockwise_attention, scale=scale, chunk_size=shape[1])
    chunked = functools.partial(B.blockwise_attention, scale=scale, chunk_size=4)
    assert "scan" not in _jaxpr(dense, q, k, v) and "scan" in _jaxpr(chunked, q, k, v)
    want = dense(q, k, v)
    assert_close(want, _torch_attention(q, k, v, scale))
    assert_close(jax.jit(chunked)(q, k, v), want)
    for got, expected in zip(_grads(chunked)(q, k, v), _grads(dense)(q, k, v), strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_one_hot_keys_pick_one_value(chunk_size):
    keys = np.eye(6, dtype=np.float32)[None]
    target = np.array([4, 0, 5, 1, 3, 2, 2])  # query i attends to key target[i] only
    queries = np.eye(6, dtype=np.float32)[target][None]
    v = random_nhwc((1, 6, 3))
    out = B.blockwise_attention(queries, keys, v, scale=100.0, chunk_size=chunk_size)
    np.testing.assert_allclose(out[0], v[0, target], atol=1e-6)


def test_zero_queries_average_the_values_and_scale_is_a_temperature():
    q, k, v = _qkv(2, 9, 5, 2, 3)
    out = B.blockwise_attention(np.zeros_like(q), k, v, chunk_size=4)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(1, keepdims=True), out.shape),
                               rtol=1e-6, atol=1e-6)
    assert_close(B.blockwise_attention(q, k, v, scale=0.5, chunk_size=4),
                 B.blockwise_attention(0.5 * q, k, v, chunk_size=4))


@pytest.mark.parametrize("scale", SCALES)
def test_chunked_grads(scale):
    fn = functools.partial(B.blockwise_attention, scale=scale, chunk_size=3)
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in _qkv(1, 7, 5, 2, 3))
        check_grads(jax.jit(fn), args, order=1, modes=["rev"])


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_jit_and_vmap_equal_eager(implementation):
    q, k, v = _qkv(2, 9, 7, 2, 3)
    fn = functools.partial(B.blockwise_attention, chunk_size=4, implementation=implementation)
    eager = fn(q, k, v)
    assert_close(jax.jit(fn)(q, k, v), eager)
    stacked = jax.vmap(fn)(*(np.stack([a, 2 * a]) for a in (q, k, v)))
    assert_close(stacked[0], eager)
    assert_close(stacked[1], fn(2 * q, 2 * k, 2 * v))


@pytest.mark.parametrize(
    "implementation", ["xla", pytest.param("pallas", marks=pytest.mark.slow)]
)
def test_bfloat16_is_finite_and_close(implementation):
    q, k, v = _qkv(2, 21, 21, 4, 6)
    fn = functools.partial(B.blockwise_attention, chunk_size=8, implementation=implementation)
    low_args = tuple(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    low = jax.jit(fn)(*low_args)
    assert low.dtype == jnp.bfloat16 and bool(jnp.isfinite(low).all())
    assert_close(low.astype(jnp.float32), jax.jit(fn)(q, k, v), rtol=3e-2)
    for got, want in zip(_grads(fn)(*low_args), _grads(fn)(q, k, v), strict=True):
        assert got.dtype == jnp.bfloat16 and bool(jnp.isfinite(got).all())
        assert_close(got.astype(jnp.float32), want, rtol=5e-2)


def test_large_logits_stay_finite():
    q, k, v = _qkv(1, 9, 9, 2, 2)
    for implementation in ("xla", "pallas"):
        out = B.blockwise_attention(1e4 * q, 1e4 * k, v, chunk_size=4,
                                    implementation=implementation)
        assert bool(jnp.isfinite(out).all())


# --- the Pallas flash kernel ----------------------------------------------------------------------

SMALL_BLOCKS = flash.BlockSizes(block_q=16, block_k=16, block_cv=16)


@pytest.fixture(params=[True, False] if on_gpu() else [True],
                ids=lambda i: "interpret" if i else "compiled")
def interpret(request) -> bool:
    """The kernel's `interpret` argument: True everywhere, False too on a GPU."""
    return request.param


@pytest.mark.parametrize(
    ("shape", "dtype", "blocks"),
    _default_and_slow(itertools.product(SHAPES, [F32, BF16], [SMALL_BLOCKS, None]),
                      [(SHAPES[0], F32, SMALL_BLOCKS), (SHAPES[1], BF16, SMALL_BLOCKS),
                       (SHAPES[2], F32, None)]),
)
def test_flash_kernel_equals_reference(interpret, shape, dtype, blocks):
    q, k, v = (jnp.asarray(a, dtype) for a in _qkv(*shape))
    out, lse = flash.flash_attention_forward(q, k, v, scale=0.37, block_sizes=blocks,
                                             interpret=interpret)
    want_out, want_lse = flash.flash_attention_reference(q, k, v, scale=0.37)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_close(out.astype(jnp.float32), want_out.astype(jnp.float32),
                 rtol=1e-5 if dtype == jnp.float32 else 2e-2)
    assert_close(lse, want_lse, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    _default_and_slow(itertools.product(SHAPES, [F32, BF16]), [(SHAPES[0], F32),
                                                                 (SHAPES[2], BF16)]),
)
def test_pallas_path_equals_xla_values_and_grads(shape, dtype):
    args = tuple(jnp.asarray(a, dtype) for a in _qkv(*shape))
    pallas = functools.partial(B.blockwise_attention, scale=0.37, chunk_size=8,
                               implementation="pallas")
    xla = functools.partial(B.blockwise_attention, scale=0.37, chunk_size=8, implementation="xla")
    assert "pallas_call" in _jaxpr(pallas, *args) and "pallas_call" not in _jaxpr(xla, *args)
    rtol = 1e-5 if dtype == jnp.float32 else 3e-2
    _assert_trees_close([jax.jit(pallas)(*args)], [jax.jit(xla)(*args)], rtol)
    _assert_trees_close(_grads(pallas)(*args), _grads(xla)(*args), 2 * rtol)


def test_flash_attention_grads_equal_reference(interpret):
    """The custom VJP (kernel forward, blockwise backward by 4 queries) against autodiff of the
    reference."""
    q, k, v = (jnp.asarray(a) for a in _qkv(*SHAPES[1]))
    kernel = functools.partial(flash.flash_attention, scale=0.37, chunk_size=4,
                               block_sizes=SMALL_BLOCKS, interpret=interpret)
    _assert_trees_close(_grads(kernel)(q, k, v),
                        _grads(lambda *a: flash.flash_attention_reference(*a, scale=0.37)[0])(
                            q, k, v), 1e-5)


def test_default_implementation_is_xla_on_every_platform():
    """None picks neither the kernel nor cuDNN: neither has been timed on a GPU yet."""
    q, k, v = _qkv(1, 9, 9, 2, 3)
    jaxpr = _jaxpr(B.blockwise_attention, q, k, v)
    assert "pallas_call" not in jaxpr and "cudnn" not in jaxpr
    assert_close(B.blockwise_attention(q, k, v), B.blockwise_attention(q, k, v, chunk_size=4))


# --- memory: the blockwise path never holds the [B, L, L] map ------------------------------------


def _temp_bytes(fn, *shapes) -> int:
    """Bytes of temporaries in the compiled `fn`. On the CPU, XLA's YNNPACK fusions keep their
    scratch out of the buffer assignment (the dense map then shows as 0 bytes while it is
    allocated), so they are turned off for the measurement: every buffer is counted."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    options = None if on_gpu() else {"xla_cpu_experimental_ynn_fusion_type": ""}
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    return compiled.memory_analysis().temp_size_in_bytes


def _memory_implementations() -> list[str]:
    return ["xla", "pallas"] if on_gpu() else ["xla"]


@pytest.mark.parametrize("implementation", _memory_implementations())
def test_peak_memory_stays_below_the_dense_map(implementation):
    length = 128 * 128  # the dense float32 map is 1 GiB per batch item
    budget = length * length * 4
    shapes = ((1, length, 8), (1, length, 8), (1, length, 16))

    def attention(chunk_size, impl):
        fn = functools.partial(B.blockwise_attention, chunk_size=chunk_size, implementation=impl)
        loss = jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))
        return fn, loss

    dense, dense_loss = attention(length, "xla")
    blockwise, blockwise_loss = attention(512, implementation)
    assert _temp_bytes(dense, *shapes) >= budget
    assert _temp_bytes(dense_loss, *shapes) >= budget
    assert _temp_bytes(blockwise, *shapes) < budget // 8
    assert _temp_bytes(blockwise_loss, *shapes) < budget // 8


# --- non-local and PAM through the blockwise path -------------------------------------------------


@pytest.mark.parametrize(("mode", "use_scale"), [("gaussian", False), ("embedded", True)])
def test_non_local_softmax_modes_go_blockwise(mode, use_scale):
    theta, phi, g = _qkv(2, 20, 5, 3, 4)
    fn = functools.partial(non_local, mode=mode, use_scale=use_scale)
    chunked = functools.partial(fn, chunk_size=6)
    pallas = functools.partial(fn, implementation="pallas")
    assert "scan" in _jaxpr(chunked, theta, phi, g) and "scan" not in _jaxpr(fn, theta, phi, g)
    assert "pallas_call" in _jaxpr(pallas, theta, phi, g)
    weights = non_local_weights(theta, phi, mode, use_scale=use_scale)
    dense = np.einsum("bqk,bkc->bqc", weights, g)
    assert_close(chunked(theta, phi, g), dense)
    if use_scale:  # the kernel's values once (interpret mode is slow), with a scale
        assert_close(pallas(theta, phi, g), dense)
    for got, want in zip(_grads(chunked)(theta, phi, g), _grads(fn)(theta, phi, g), strict=True):
        assert_close(got, want)


def test_non_local_dense_modes_stay_dense():
    theta, phi, g = _qkv(1, 6, 3, 2, 2)
    out = non_local(theta, phi, g, "dot", chunk_size=2)
    assert "scan" not in _jaxpr(functools.partial(non_local, mode="dot",
                                                  chunk_size=2), theta, phi, g)
    assert_close(out, np.einsum("bqc,bkc,bkd->bqd", theta, phi, g) / 3)
    with pytest.raises(ValueError, match="mode 'dot' has no Pallas kernel"):
        non_local(theta, phi, g, "dot", implementation="pallas")


@pytest.mark.parametrize(
    ("module", "shape"),
    [(PositionAttention, (2, 5, 7, 16)), (functools.partial(NonLocal2D, mode="gaussian"),
                                          (1, 6, 5, 4))],
)
def test_modules_pass_chunk_size_and_implementation(module, shape):
    x = random_nhwc(shape)
    variables = module().init(jax.random.key(0), x)
    # Non-zero residual scales, so the attention reaches the output.
    variables = jax.tree.map(lambda a: a + 0.5, variables)
    want = module().apply(variables, x)
    assert_close(module(chunk_size=4).apply(variables, x), want)
    assert "scan" in _jaxpr(module(chunk_size=4).apply, variables, x)
    assert "pallas_call" in _jaxpr(module(implementation="pallas").apply, variables, x)
    assert "pallas_call" not in _jaxpr(module(implementation="xla").apply, variables, x)
    with pytest.raises(ValueError, match="apply to the default attention_fn"):
        module(chunk_size=4, attention_fn=lambda *a, **kw: a[0]).apply(variables, x)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((2, 3), (2, 3, 2), (2, 3, 2)), {}, r"q must have rank 3.*\(2, 3\)"),
        (((2, 3, 2), (2, 3, 3), (2, 3, 2)), {}, r"q \(2, 3, 2\), k \(2, 3, 3\)"),
        (((2, 3, 2), (1, 3, 2), (1, 3, 2)), {}, r"batch and channels"),
        (((2, 3, 2), (2, 3, 2), (2, 4, 5)), {}, r"k \(2, 3, 2\), v \(2, 4, 5\)"),
        (((1, 3, 2), (1, 3, 2), (1, 3, 5)), {"chunk_size": 0}, "chunk_size"),
        (((1, 3, 2), (1, 3, 2), (1, 3, 5)), {"implementation": "cuda"},
         r"implementation must be one of .* for blockwise_attention, got 'cuda'"),
        (((1, 3, 8), (1, 3, 8), (1, 3, 5)), {"implementation": "cudnn"}, "cuDNN"),
        (((1, 3, 600), (1, 3, 600), (1, 3, 5)), {"implementation": "pallas"},
         "q/k channels 600"),
    ],
)
def test_bad_input(shapes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        B.blockwise_attention(*(np.zeros(s, np.float32) for s in shapes), **kwargs)


def test_pallas_rejects_float64_and_bad_blocks():
    with jax.enable_x64(True), pytest.raises(ValueError, match="dtype float64"):
        args = (jnp.zeros((1, 3, 2), jnp.float64),) * 3
        B.blockwise_attention(*args, implementation="pallas")
    with pytest.raises(ValueError, match="block_q must be a power of two >= 16, got 24"):
        flash.BlockSizes(block_q=24)
