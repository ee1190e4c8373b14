"""The Pallas kernels lower for the GPU (Triton) without a GPU: each public function with
`implementation="pallas"`, and its gradient, is exported for the "cuda" platform with
`jax.export`, which runs Pallas's Triton lowering (block shapes, masks, dtypes, the ops used) and
must produce one Triton custom call per kernel. This does not run the kernels: the interpret-mode
tests check their values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from flax_attention.functional import (
    bilinear_sample,
    criss_cross_attention,
    non_local,
    position_attention,
)
from flax_attention.kernels import _dispatch
from flax_attention.kernels import bilinear as bilinear_kernels
from flax_attention.kernels import criss_cross as criss_cross_kernels

_TRITON = "__gpu$xla.gpu.triton"
KERNEL_MODULES = (bilinear_kernels, criss_cross_kernels, _dispatch)


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    """The kernels as on a GPU: not interpreted."""
    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "interpret", lambda: False)


def _triton_calls(fn, *shapes: jax.ShapeDtypeStruct) -> int:
    exported = export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON)],
    )(*shapes)
    return exported.mlir_module().count(f"@{_TRITON}")


def _grad(fn, argnums):
    return jax.grad(lambda *args: fn(*args).astype(jnp.float32).sum(), argnums=argnums)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_criss_cross_lowers_to_triton(dtype):
    qk = jax.ShapeDtypeStruct((2, 13, 21, 8), dtype)
    v = jax.ShapeDtypeStruct((2, 13, 21, 40), dtype)

    def attend(q, k, v):
        return criss_cross_attention(q, k, v, implementation="pallas")

    assert _triton_calls(attend, qk, qk, v) >= 1
    forward = _triton_calls(attend, qk, qk, v)
    assert _triton_calls(_grad(attend, (0, 1, 2)), qk, qk, v) > forward


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_bilinear_sample_lowers_to_triton(padding_mode):
    image = jax.ShapeDtypeStruct((2, 11, 17, 3), jnp.float32)
    grid = jax.ShapeDtypeStruct((2, 9, 6, 2), jnp.float32)

    def sample(image, grid):
        return bilinear_sample(image, grid, padding_mode, implementation="pallas")

    forward = _triton_calls(sample, image, grid)
    assert forward >= 1
    assert _triton_calls(_grad(sample, (0, 1)), image, grid) > forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_position_attention_lowers_to_triton(dtype):
    qk = jax.ShapeDtypeStruct((1, 9, 11, 8), dtype)
    v = jax.ShapeDtypeStruct((1, 9, 11, 24), dtype)

    def attend(q, k, v):
        return position_attention(q, k, v, implementation="pallas")

    assert _triton_calls(attend, qk, qk, v) == 1
    # The backward recomputes the blocks in XLA from the saved log-sum-exp.
    assert _triton_calls(_grad(attend, (0, 1, 2)), qk, qk, v) == 1


def test_non_local_lowers_to_triton():
    theta = jax.ShapeDtypeStruct((2, 50, 8), jnp.float32)
    phi = jax.ShapeDtypeStruct((2, 13, 8), jnp.float32)
    g = jax.ShapeDtypeStruct((2, 13, 16), jnp.float32)

    def attend(theta, phi, g):
        return non_local(theta, phi, g, mode="embedded", implementation="pallas")

    assert _triton_calls(attend, theta, phi, g) == 1
