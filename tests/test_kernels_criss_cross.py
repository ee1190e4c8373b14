"""Pallas criss-cross kernels (CCNet) against `criss_cross_reference` and the XLA path: values
and gradients.

Every test runs the kernels in Pallas interpret mode (CPU or not), by their `interpret`
argument; on a GPU the same tests run compiled as well (the `interpret` fixture). Shapes are
tiny but ragged: lines and channels that are not multiples of the blocks, lines of length one,
several value channel blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_attention.criss_cross import CrissCrossAttention, RCCAModule
from flax_attention.functional.criss_cross import criss_cross_attention
from flax_attention.kernels import criss_cross as kernel
from flax_attention.kernels._common import on_gpu
from tests.helpers import assert_close, random_nhwc

INTERPRET = [True, False] if on_gpu() else [True]
SMALL = kernel.BlockSizes(block_c=16)  # several value channel blocks at tiny sizes

# (B, H, W, C_qk, C_v), dtype
CASES = [
    pytest.param((1, 5, 7, 3, 20), jnp.float32, id="ragged-f32"),
    pytest.param((2, 1, 6, 2, 5), jnp.float32, id="one-row-f32"),  # columns: self only
    pytest.param((1, 5, 7, 3, 20), jnp.bfloat16, id="ragged-bf16"),
    pytest.param((1, 6, 1, 4, 3), jnp.float32, id="one-column-f32", marks=pytest.mark.slow),
    pytest.param((2, 9, 17, 8, 40), jnp.float32, id="larger-f32", marks=pytest.mark.slow),
    pytest.param((2, 9, 17, 8, 40), jnp.float16, id="larger-f16", marks=pytest.mark.slow),
]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 3e-3}


@pytest.fixture(params=INTERPRET, ids=lambda i: "interpret" if i else "compiled")
def pallas(request):
    """The kernels at small blocks: interpreted everywhere, compiled (Triton) too on a GPU."""
    return functools.partial(kernel.criss_cross_attention, block_sizes=SMALL,
                             interpret=request.param)


def _inputs(shape, dtype, seed=0):
    b, h, w, c_qk, c_v = shape
    arrays = [random_nhwc((b, h, w, c), seed + i) for i, c in enumerate((c_qk, c_qk, c_v, c_v))]
    return [jnp.asarray(a, dtype) for a in arrays]  # q, k, v, and a cotangent for out


def _xla(q, k, v):
    return criss_cross_attention(q, k, v, implementation="xla")


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out)


def _assert_all_close(actual, expected, rtol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        assert_close(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol)


# --- values and gradients ----------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_matches_reference_and_xla(pallas, shape, dtype):
    inputs = _inputs(shape, dtype)
    got = _out_and_grads(pallas, *inputs)
    _assert_all_close(got, _out_and_grads(kernel.criss_cross_reference, *inputs),
                      TOLERANCE[dtype])
    _assert_all_close(got, _out_and_grads(_xla, *inputs), TOLERANCE[dtype])
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
    if dtype != jnp.float32:  # and close to the float32 answer
        upcast = [x.astype(jnp.float32) for x in inputs]
        _assert_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), got),
                          _out_and_grads(_xla, *upcast), 5 * TOLERANCE[dtype])


def test_zero_queries_average_row_and_column(pallas):
    """q = 0: equal weights 1 / (H + W - 1), so out = (row sum + column sum - self) / (H+W-1)."""
    q, k, v, d_out = _inputs((1, 5, 7, 3, 20), jnp.float32)
    out, (d_q, _, d_v) = _out_and_grads(pallas, jnp.zeros_like(q), k, v, d_out)
    h, w = v.shape[1:3]
    expected = (v.sum(2, keepdims=True) + v.sum(1, keepdims=True) - v) / (h + w - 1)
    assert_close(out, expected)
    # d_v: each position is seen by its row and column, itself once, with weight 1/(H+W-1).
    expected_dv = (d_out.sum(2, keepdims=True) + d_out.sum(1, keepdims=True) - d_out) / (h + w - 1)
    assert_close(d_v, expected_dv)
    assert bool(jnp.isfinite(d_q).all())


def test_one_dominant_key_picks_its_value(pallas):
    """A key aligned with every query and 50x larger than the rest takes all the weight of the
    positions whose row or column holds it."""
    q, k, v, d_out = _inputs((1, 5, 7, 3, 20), jnp.float32)
    q = jnp.ones_like(q)
    k = (0.01 * k).at[0, 2, 3].set(50.0)
    out = _out_and_grads(pallas, q, k, v, d_out)[0]
    assert_close(out[0, 2, :], jnp.broadcast_to(v[0, 2, 3], out[0, 2, :].shape))
    assert_close(out[0, :, 3], jnp.broadcast_to(v[0, 2, 3], out[0, :, 3].shape))


@pytest.mark.slow  # the default run compares gradients with the XLA path's instead
def test_check_grads(pallas):
    q, k, v, _ = _inputs((1, 3, 4, 2, 3), jnp.float32)
    check_grads(pallas, (q, k, v), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


# --- transformations ---------------------------------------------------------------------------


def test_vmap_equals_loop(pallas):
    q, k, v, _ = _inputs((2, 3, 4, 2, 3), jnp.float32)
    stacked = jax.jit(jax.vmap(pallas))(q[:, None], k[:, None], v[:, None])[:, 0]
    assert_close(stacked, jax.jit(_xla)(q, k, v))


@pytest.mark.slow
def test_eager_equals_jit(pallas):
    q, k, v, _ = _inputs((1, 3, 4, 2, 3), jnp.float32)
    assert_close(pallas(q, k, v), jax.jit(pallas)(q, k, v))


# --- dispatch and modules ----------------------------------------------------------------------


def test_dispatch():
    q, k, v, _ = _inputs((1, 3, 4, 2, 3), jnp.float32)
    with pytest.raises(ValueError, match="implementation must be one of .* for "
                                         "criss_cross_attention, got 'cuda'"):
        criss_cross_attention(q, k, v, implementation="cuda")
    with pytest.raises(ValueError, match="criss_cross_attention"):
        criss_cross_attention(q, k, v, implementation="cudnn")
    long = jnp.zeros((1, 200, 2, 2))
    with pytest.raises(ValueError, match="max_line"):
        criss_cross_attention(long, long, long, implementation="pallas")
    wide = jnp.zeros((1, 2, 2, 300))
    with pytest.raises(ValueError, match="max_qk_channels"):
        criss_cross_attention(wide, wide, long[:, :2], implementation="pallas")
    with jax.enable_x64(True):
        q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
        with pytest.raises(ValueError, match="float64"):
            criss_cross_attention(q64, k64, v64, implementation="pallas")
        with pytest.raises(ValueError, match="float64"):
            kernel.criss_cross_attention(q64, k64, v64)
        # None: XLA on every platform (the kernels have not been timed on a GPU).
        assert "pallas_call" not in _jaxpr(criss_cross_attention, q, k, v)
        assert "pallas_call" not in _jaxpr(criss_cross_attention, q64, k64, v64)
        assert jax.eval_shape(criss_cross_attention, q64, k64, v64).dtype == jnp.float64


def _jaxpr(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.slow
def test_module_implementation():
    x = jnp.asarray(random_nhwc((1, 5, 7, 16)))
    xla = CrissCrossAttention(reduction=4, implementation="xla")
    params = xla.init(jax.random.key(0), x)["params"]
    params = {**params, "gamma": jnp.ones((1,))}
    pallas = CrissCrossAttention(reduction=4, implementation="pallas")
    got = jax.jit(pallas.apply)({"params": params}, x)
    assert_close(got, jax.jit(xla.apply)({"params": params}, x))


@pytest.mark.parametrize("module_type", [CrissCrossAttention, RCCAModule])
def test_modules_pass_implementation(module_type):
    x = jnp.zeros((1, 4, 5, 32))
    for implementation, present in (("pallas", True), ("xla", False)):
        module = module_type(implementation=implementation)
        variables = jax.eval_shape(module.init, jax.random.key(0), x)
        assert ("pallas_call" in _jaxpr(module.apply, variables, x)) == present
