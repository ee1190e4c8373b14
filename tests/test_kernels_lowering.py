"""The Pallas kernels lower for the GPU (Triton) without a GPU: each kernel op, called with
`interpret=False`, and its gradient, is exported for the "cuda" platform with `jax.export`, which
runs Pallas's Triton lowering (block shapes, masks, dtypes, the ops used) and must produce one
Triton custom call per kernel. This does not run the kernels: the interpret-mode tests check
their values, and those of `implementation="pallas"` that each public function routes to them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from flax_attention.kernels import bilinear, criss_cross, deformable_attention, flash

_TRITON = "__gpu$xla.gpu.triton"


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
    attend = functools.partial(criss_cross.criss_cross_attention, interpret=False)

    forward = _triton_calls(attend, qk, qk, v)
    assert forward >= 1
    assert _triton_calls(_grad(attend, (0, 1, 2)), qk, qk, v) > forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bilinear_gather_lowers_to_triton(dtype):
    """The corners of 2 x 9 x 6 samples in a 2 x 11 x 17 image (the kernels are the same for
    every padding mode: `functional.spatial` computes rows and weights)."""
    image = jax.ShapeDtypeStruct((2 * 11 * 17, 3), dtype)
    rows = jax.ShapeDtypeStruct((4, 2 * 9 * 6), jnp.int32)
    weights = jax.ShapeDtypeStruct((4, 2 * 9 * 6), jnp.float32)

    def sample(image, rows, weights):
        return bilinear.bilinear_gather(image, rows, weights, 18, bilinear.BlockSizes(), False)

    forward = _triton_calls(sample, image, rows, weights)
    assert forward >= 1
    assert _triton_calls(_grad(sample, (0, 2)), image, rows, weights) > forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_deformable_gather_lowers_to_triton(dtype):
    """2 x 7 queries of 3 heads reading 2 levels x 3 points in 2 x 3 x 41 values of 5 channels;
    the backward runs bilinear's scatter and corner dots."""
    value = jax.ShapeDtypeStruct((2 * 3 * 41, 5), dtype)
    rows = jax.ShapeDtypeStruct((4, 2 * 3, 2 * 7 * 3), jnp.int32)
    weights = jax.ShapeDtypeStruct((4, 2 * 3, 2 * 7 * 3), jnp.float32)

    def attend(value, rows, weights):
        return deformable_attention.deformable_gather(value, rows, weights, 8,
                                                      deformable_attention.BlockSizes(), False)

    assert _triton_calls(attend, value, rows, weights) == 1
    assert _triton_calls(_grad(attend, (0, 2)), value, rows, weights) == 2


@pytest.mark.parametrize(
    ("q", "k", "v", "dtype"),
    [
        # DANet's PAM on 9 x 11 positions, in both dtypes.
        pytest.param((1, 99, 8), (1, 99, 8), (1, 99, 24), jnp.float32, id="pam-f32"),
        pytest.param((1, 99, 8), (1, 99, 8), (1, 99, 24), jnp.bfloat16, id="pam-bf16"),
        # The non-local block's embedded mode with sub-sampled keys.
        pytest.param((2, 50, 8), (2, 13, 8), (2, 13, 16), jnp.float32, id="non-local"),
    ],
)
def test_flash_attention_lowers_to_triton(q, k, v, dtype):
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in (q, k, v)]
    attend = functools.partial(flash.flash_attention, interpret=False)

    assert _triton_calls(attend, *shapes) == 1
    # The backward recomputes the blocks in XLA from the saved log-sum-exp.
    assert _triton_calls(_grad(attend, (0, 1, 2)), *shapes) == 1
