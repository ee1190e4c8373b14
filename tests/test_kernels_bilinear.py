"""The Pallas bilinear-sampling kernels against the XLA path: values and gradients (image and
grid) over every padding mode, both `align_corners`, fp32 and bf16, ragged shapes; the kernels
alone (`bilinear_gather`, values and `jax.grad`) against `bilinear_gather_reference`, plain
gathers and scatter-adds; dispatch and unsupported inputs.

Through `bilinear_sample(implementation="pallas")` the kernels run interpreted off the GPU and
compiled on one; the kernel tests pass `interpret` themselves, and on a GPU run both ways (the
`interpret` fixture). Shapes are tiny and shared, so the interpreted kernels compile once per
dtype: L = 2 * 3 * 6 = 36 sample points (not a multiple of the 64-point
block), R = 2 * 5 * 7 = 70 image rows (two pixel blocks, the second ragged), C = 3 channels
(a ragged 16-channel block).
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flax_attention.functional import spatial as F
from flax_attention.kernels import bilinear as K
from flax_attention.kernels._common import on_gpu
from flax_attention.spatial_transformer import SpatialTransformer
from tests.helpers import assert_close, random_nhwc

MODES = [(p, a) for p in F.PADDING_MODES for a in (False, True)]
IMAGE, GRID_HW = (2, 5, 7, 3), (3, 6)
OUT = (*IMAGE[:1], *GRID_HW, IMAGE[-1])


@pytest.fixture(params=[True, False] if on_gpu() else [True],
                ids=lambda i: "interpret" if i else "compiled")
def interpret(request) -> bool:
    """The kernels' `interpret` argument: True everywhere, False too on a GPU."""
    return request.param


def _grid(spread: float = 1.4, seed: int = 2) -> np.ndarray:
    """Uniform coordinates in [-spread, spread]: many samples fall outside the image."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-spread, spread, (IMAGE[0], *GRID_HW, 2)).astype(np.float32)


def _vjp(implementation, image, grid, cotangent, padding_mode="zeros", align_corners=False):
    """Output, image gradient and grid gradient of one implementation."""
    fn = functools.partial(F.bilinear_sample, padding_mode=padding_mode,
                           align_corners=align_corners, implementation=implementation)
    out, vjp = jax.vjp(fn, jnp.asarray(image), jnp.asarray(grid))
    return (out, *vjp(jnp.asarray(cotangent, out.dtype)))


# --- the public function: Pallas against XLA ---------------------------------------------------


# Two modes by default (the bf16 test below takes the same two); every mode with -m slow.
@pytest.mark.parametrize(("padding_mode", "align_corners"), [
    m if m in (("zeros", False), ("reflection", True)) else pytest.param(*m, marks=pytest.mark.slow)
    for m in MODES])
def test_pallas_matches_xla(padding_mode, align_corners):
    image, grid, cotangent = random_nhwc(IMAGE), _grid(), random_nhwc(OUT, 1)
    args = (image, grid, cotangent, padding_mode, align_corners)
    for a, e in zip(_vjp("pallas", *args), _vjp("xla", *args), strict=True):
        assert_close(a, e)


@pytest.mark.parametrize(("padding_mode", "align_corners"), [("zeros", False),
                                                             ("reflection", True)])
def test_pallas_bfloat16_matches_xla(padding_mode, align_corners):
    """bf16 image and grid: outputs and gradients in bf16, finite, close to the XLA path's (both
    sum in float32; they differ by the bf16 roundings of the results)."""
    image = jnp.asarray(random_nhwc(IMAGE), jnp.bfloat16)
    grid = jnp.asarray(_grid(), jnp.bfloat16)
    args = (image, grid, random_nhwc(OUT, 1), padding_mode, align_corners)
    for a, e in zip(_vjp("pallas", *args), _vjp("xla", *args), strict=True):
        assert a.dtype == jnp.bfloat16
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert_close(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=2e-2)


def test_pixel_centres_reproduce_the_image():
    """Hand-checkable: sampling at the centres of the top-left 3 x 6 pixels returns them."""
    image = random_nhwc(IMAGE)
    theta = jnp.asarray([[[6 / 7, 0, -1 / 7], [0, 3 / 5, -2 / 5]]] * IMAGE[0])
    out = F.bilinear_sample(image, F.affine_grid(theta, GRID_HW), implementation="pallas")
    assert_close(out, image[:, :3, :6])


def test_every_point_on_one_pixel_collects_the_whole_gradient():
    """Hand-checkable scatter: all 18 points of an image sample the centre of pixel (2, 3);
    its gradient is the sum of their output gradients, every other pixel's is 0."""
    grid = np.zeros((IMAGE[0], *GRID_HW, 2), np.float32)
    grid[..., 0], grid[..., 1] = (2 * 3 + 1) / 7 - 1, (2 * 2 + 1) / 5 - 1
    cotangent = random_nhwc(OUT, 1)
    d_image = np.asarray(_vjp("pallas", random_nhwc(IMAGE), grid, cotangent)[1])
    expected = np.zeros(IMAGE, np.float32)
    expected[:, 2, 3] = cotangent.sum(axis=(1, 2))
    assert_close(d_image, expected)


def test_check_grads():
    """Finite differences in float32 with coordinates away from pixel centres (the bilinear
    interpolant has kinks there)."""
    rng = np.random.default_rng(4)
    cells = rng.integers(0, (6, 4), (IMAGE[0], *GRID_HW, 2)) + rng.uniform(0.3, 0.7, (2, 3, 6, 2))
    grid = jnp.asarray((cells + 0.5) / np.array([7, 5]) * 2 - 1, jnp.float32)
    fn = functools.partial(F.bilinear_sample, implementation="pallas")
    check_grads(fn, (jnp.asarray(random_nhwc(IMAGE)), grid), order=1, modes=["rev"],
                eps=1e-3, atol=1e-2, rtol=1e-2)


def test_jit_and_vmap_equal_eager():
    images, grids = random_nhwc((2, *IMAGE)), np.stack([_grid(seed=s) for s in (5, 6)])
    sample = functools.partial(F.bilinear_sample, padding_mode="border", implementation="pallas")
    eager = np.stack([sample(i, g) for i, g in zip(images, grids, strict=True)])
    assert_close(jax.jit(sample)(images[0], grids[0]), eager[0])
    assert_close(jax.vmap(sample)(images, grids), eager)


def test_spatial_transformer_passes_the_implementation_through():
    module = SpatialTransformer(_ConstantLocalization(), out_hw=GRID_HW, padding_mode="border")
    x = random_nhwc(IMAGE)
    variables = module.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a transform that is not the identity
    xla = module.apply(variables, x)
    assert_close(module.clone(implementation="pallas").apply(variables, x), xla)
    with pytest.raises(ValueError, match="implementation must be one of"):
        module.clone(implementation="cuda").apply(variables, x)


class _ConstantLocalization(nn.Module):
    """A localization net without parameters: the channel means."""

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


# --- dispatch ------------------------------------------------------------------------------------


def test_default_is_xla_on_every_platform():
    """None never runs the kernels (not yet timed on a GPU), here or on a GPU."""
    image, grid = random_nhwc(IMAGE), _grid()
    assert "pallas_call" not in str(jax.make_jaxpr(F.bilinear_sample)(image, grid))
    assert "pallas_call" in str(jax.make_jaxpr(
        functools.partial(F.bilinear_sample, implementation="pallas"))(image, grid))
    chex.assert_trees_all_equal(F.bilinear_sample(image, grid),
                                F.bilinear_sample(image, grid, implementation="xla"))


def test_unsupported_dtype_falls_back_or_raises():
    with jax.enable_x64(True):
        image, grid = jnp.asarray(random_nhwc(IMAGE), jnp.float64), jnp.asarray(_grid())
        with pytest.raises(ValueError, match="implementation='pallas' cannot run.*float64"):
            F.bilinear_sample(image, grid, implementation="pallas")
        assert F.bilinear_sample(image, grid).dtype == jnp.float64
    with pytest.raises(ValueError, match="implementation must be one of .* for bilinear_sample"):
        F.bilinear_sample(random_nhwc(IMAGE), _grid(), implementation="triton")
    with pytest.raises(ValueError, match="bilinear_sample"):
        F.bilinear_sample(random_nhwc(IMAGE), _grid(), implementation="cudnn")


# --- the kernels alone: small blocks, several channel blocks, long runs --------------------------

SMALL = K.BlockSizes(samples=16, pixels=16, channels=16)


def _kernel_inputs(num_rows=70, channels=20, length=45, width=7, seed=0):
    """Rows of four neighbours crowded into the first 20 image rows (long runs per block) with
    random weights, an image `[R, C]` and an output gradient `[L, C]`."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 20, length)
    rows = np.stack([first, first + 1, first + width, first + width + 1]).astype(np.int32)
    weights = rng.uniform(-1, 1, (4, length)).astype(np.float32)
    return (jnp.asarray(rows), jnp.asarray(weights),
            jnp.asarray(rng.standard_normal((num_rows, channels)), jnp.float32),
            jnp.asarray(rng.standard_normal((length, channels)), jnp.float32))


def test_kernels_match_plain_gathers_and_scatters(interpret):
    rows, weights, image, g = _kernel_inputs()
    values = image[rows]  # [4, L, C]
    assert_close(K.gather(image, rows, weights, SMALL, interpret),
                 jnp.einsum("kl,klc->lc", weights, values))
    assert_close(K.corner_dots(image, rows, g, SMALL, interpret),
                 jnp.einsum("klc,lc->kl", values, g))
    expected = jnp.zeros_like(image).at[rows.reshape(-1)].add(
        (weights[..., None] * g).reshape(-1, image.shape[1]))
    assert_close(K.scatter(rows, weights, g, num_rows=image.shape[0], span=8,
                           block_sizes=SMALL, interpret=interpret), expected)


def test_bilinear_gather_matches_reference(interpret):
    """The custom VJP's values and `jax.vjp` (image and weights) against the reference's."""
    rows, weights, image, g = _kernel_inputs()
    got, vjp = jax.vjp(lambda i, w: K.bilinear_gather(i, rows, w, 8, SMALL, interpret),
                       image, weights)
    want, vjp_ref = jax.vjp(lambda i, w: K.bilinear_gather_reference(i, rows, w), image, weights)
    for a, e in zip((got, *vjp(g)), (want, *vjp_ref(g)), strict=True):
        assert a.dtype == e.dtype
        assert_close(a, e)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="BlockSizes.pixels must be a power of two >= 16, got 24"):
        K.BlockSizes(pixels=24)
