"""Spatial transformers: affine_grid / bilinear_sample against torch, the module against the STN
tutorial's stn(), gradients, conventions at integer coordinates, dtypes and bad input."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from jax.test_util import check_grads

from flax_attention.functional import sampling
from flax_attention.functional import spatial as F
from flax_attention.interop.torch import from_torch
from flax_attention.spatial_transformer import LocalizationNet, SpatialTransformer
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import spatial_transformer as ref

MODES = [(p, a) for p in F.PADDING_MODES for a in (False, True)]
IMAGE = (2, 4, 6, 3)  # most tests share this shape, and so their compiled functions


def _theta(batch: int, spread: float, seed: int = 0) -> np.ndarray:
    """Affine matrices around the identity; a large `spread` samples far outside the image."""
    noise = np.random.default_rng(seed).standard_normal((batch, 2, 3))
    return (np.eye(2, 3) + spread * noise).astype(np.float32)


def _torch_sample(image, grid, cotangent, padding_mode, align_corners):
    """torch's grid_sample: output, image gradient and grid gradient (NHWC / [B, h, w, 2])."""
    t_image = nhwc_to_torch(image).requires_grad_()
    t_grid = torch.tensor(np.asarray(grid)).requires_grad_()
    out = TF.grid_sample(t_image, t_grid, mode="bilinear", padding_mode=padding_mode,
                         align_corners=align_corners)
    out.backward(nhwc_to_torch(cotangent))
    return torch_to_nhwc(out), torch_to_nhwc(t_image.grad), t_grid.grad.numpy()


def _jax_sample(image, grid, cotangent, padding_mode, align_corners):
    fn = functools.partial(F.bilinear_sample, padding_mode=padding_mode,
                           align_corners=align_corners)
    out, vjp = jax.vjp(fn, jnp.asarray(image), jnp.asarray(grid))
    return (out, *vjp(jnp.asarray(cotangent)))


def _assert_matches_torch(image, grid, padding_mode, align_corners, seed=1):
    cotangent = random_nhwc((*grid.shape[:3], image.shape[-1]), seed)
    actual = _jax_sample(image, grid, cotangent, padding_mode, align_corners)
    expected = _torch_sample(image, grid, cotangent, padding_mode, align_corners)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


# --- affine_grid ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_hw", [(4, 6), (1, 5), (3, 1)])
def test_affine_grid_matches_torch(out_hw, align_corners):
    theta = _theta(3, 1.0)
    expected = TF.affine_grid(torch.tensor(theta), (3, 2, *out_hw), align_corners=align_corners)
    assert_close(F.affine_grid(jnp.asarray(theta), out_hw, align_corners), expected.numpy())


def test_affine_grid_identity_is_pixel_centres():
    """Hand-checkable: 2 x 4 pixels; centres at +-1/2 in y and +-1/4, +-3/4 in x."""
    grid = F.affine_grid(jnp.asarray(np.eye(2, 3, dtype=np.float32)[None]), (2, 4))
    chex.assert_trees_all_close(grid[0, :, :, 0], np.tile([-0.75, -0.25, 0.25, 0.75], (2, 1)))
    chex.assert_trees_all_close(grid[0, :, :, 1], np.repeat([[-0.5], [0.5]], 4, axis=1))


# --- bilinear_sample against torch ------------------------------------------------------------


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_bilinear_sample_matches_torch(padding_mode, align_corners):
    """Values and gradients: a non-square image, an output size unlike the input's, samples
    near the image (spread 0.3) and mostly outside it (spread 2), and single-pixel axes."""
    image = random_nhwc(IMAGE)
    for spread in (0.3, 2.0):
        grid = F.affine_grid(jnp.asarray(_theta(2, spread)), (3, 5), align_corners)
        _assert_matches_torch(image, grid, padding_mode, align_corners)
    grid = np.random.default_rng(2).uniform(-1.5, 1.5, (1, 3, 3, 2)).astype(np.float32)
    for shape in [(1, 1, 4, 2), (1, 4, 1, 2)]:
        _assert_matches_torch(random_nhwc(shape), grid, padding_mode, align_corners)


def _lattice(xs, ys) -> np.ndarray:
    """`[1, len(ys), len(xs), 2]` grid of every (x, y) pair."""
    x, y = np.meshgrid(np.asarray(xs, np.float32), np.asarray(ys, np.float32))
    return np.stack([x, y], axis=-1)[None]


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_gradient_conventions_at_integer_coordinates_and_clip_limits(padding_mode, align_corners):
    """Grid points exactly on pixels, on the clip limits and beyond (exact in binary): the grid
    gradient takes the right/lower neighbour and is zero on clipped limits, as torch's."""
    if align_corners:  # W = 5, H = 3: pixel x = (x + 1) * 2, y = y + 1
        image = random_nhwc((1, 3, 5, 2))
        grid = _lattice([-3, -1.5, -1, -0.5, 0, 0.25, 1, 1.5, 2.5], [-2, -1, 0, 0.5, 1, 1.5])
    else:  # W = 4, H = 2: pixel x = (x + 1) * 2 - 0.5, y = y + 0.5
        image = random_nhwc((1, 2, 4, 2))
        grid = _lattice([-2, -1.25, -1, -0.75, -0.25, 0.75, 1, 1.25, 2], [-1.5, -0.5, 0.5, 1.5])
    _assert_matches_torch(image, grid, padding_mode, align_corners)


# --- hand-checkable values and gradients ------------------------------------------------------


@pytest.mark.parametrize(("padding_mode", "align_corners"), MODES)
def test_identity_theta_reproduces_the_image(padding_mode, align_corners):
    image = random_nhwc(IMAGE)
    theta = jnp.asarray(np.tile(np.eye(2, 3, dtype=np.float32), (2, 1, 1)))
    grid = F.affine_grid(theta, IMAGE[1:3], align_corners)
    assert_close(F.bilinear_sample(image, grid, padding_mode, align_corners), image)


@pytest.mark.parametrize("padding_mode", F.PADDING_MODES)
def test_translation_by_one_pixel(padding_mode):
    """tx = 2 / W shifts the image one pixel left; the new last column (pixel x = 6) is 0
    ("zeros") or the old last column ("border"; "reflection" about the edge at x = 5.5)."""
    image = random_nhwc(IMAGE)
    theta = F.affine_matrix(jnp.asarray([[1 / 3, 0.0]] * 2), "translation")
    out = np.asarray(F.bilinear_sample(image, F.affine_grid(theta, IMAGE[1:3]), padding_mode))
    last = {"zeros": np.zeros_like(image[:, :, 0]), "border": image[:, :, -1],
            "reflection": image[:, :, -1]}[padding_mode]
    assert_close(out, np.concatenate([image[:, :, 1:], last[:, :, None]], axis=2))


def test_rotation_by_a_quarter_turn_is_rot90():
    image = random_nhwc((1, 5, 5, 2))
    theta = F.affine_matrix(jnp.asarray([[np.pi / 2, 1.0, 0.0, 0.0]]), "rotation_translation_scale")
    out = F.bilinear_sample(image, F.affine_grid(theta, (5, 5), True), align_corners=True)
    assert_close(out, np.rot90(image, axes=(1, 2)))


def test_midpoint_is_the_mean_and_grid_gradient_is_the_slope():
    """A ramp image 0, 1, 2, 3 (align_corners: pixel x = (x + 1) * 1.5): sampling at x = 0
    (pixel 1.5) gives 1.5, and d out / d x = 1.5."""
    image = jnp.arange(4.0).reshape(1, 1, 4, 1)
    grid = jnp.zeros((1, 1, 1, 2))
    out, vjp = jax.vjp(lambda g: F.bilinear_sample(image, g, align_corners=True), grid)
    chex.assert_trees_all_close(out, jnp.full((1, 1, 1, 1), 1.5))
    chex.assert_trees_all_close(vjp(jnp.ones_like(out))[0], jnp.asarray([[[[1.5, 0.0]]]]))



@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_gradient_on_pixel_centres_and_edges_is_torchs(padding_mode, align_corners):
    """Under jit, on points that torch's unnormalisation puts exactly on a pixel centre or edge
    (where the clip and reflection slopes switch): x = -1 - 1/(3W) reflects onto pixel 0 at
    W = 3 (its gradient was -3.9 instead of torch's 0 with another order of operations)."""
    width = 3
    image = random_nhwc((1, 4, width, 2))
    xs = np.concatenate([[-1 - 1 / (3 * width), -1 - 2 / (3 * width)],
                         -1 + np.arange(-3, 2 * width + 4) / width]).astype(np.float32)
    grid = np.stack(np.broadcast_arrays(xs[None, :, None], np.float32(-0.3)), -1)
    loss = jax.jit(lambda g: jnp.sum(F.bilinear_sample(
        image, g, padding_mode=padding_mode, align_corners=align_corners)))
    torch_grid = torch.from_numpy(grid).requires_grad_(True)
    TF.grid_sample(nhwc_to_torch(image), torch_grid, padding_mode=padding_mode,
                   align_corners=align_corners).sum().backward()
    np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(grid)), torch_grid.grad.numpy(),
                               atol=1e-5)

def test_affine_matrix_of_each_transform():
    chex.assert_trees_all_close(
        F.affine_matrix(jnp.asarray([[0.5, -0.25]]), "translation"),
        jnp.asarray([[[1.0, 0, 0.5], [0, 1, -0.25]]]))
    chex.assert_trees_all_close(
        F.affine_matrix(jnp.asarray([[2.0, 0.1, 0.2]]), "translation_scale"),
        jnp.asarray([[[2.0, 0, 0.1], [0, 2, 0.2]]]))
    chex.assert_trees_all_close(
        F.affine_matrix(jnp.asarray([[np.pi / 2, 2.0, 0.1, 0.2]]), "rotation_translation_scale"),
        jnp.asarray([[[0.0, -2, 0.1], [2, 0, 0.2]]]), atol=1e-6)
    chex.assert_trees_all_close(F.affine_matrix(jnp.arange(6.0)[None]),
                                jnp.arange(6.0).reshape(1, 2, 3))
    for transform, identity in F.TRANSFORMS.items():
        chex.assert_trees_all_close(F.affine_matrix(jnp.asarray([identity]), transform),
                                    jnp.eye(2, 3)[None])


# --- gradients, transformations, dtypes -------------------------------------------------------


@pytest.mark.parametrize(("padding_mode", "align_corners"),
                         [("zeros", False), ("border", True), ("reflection", False)])
def test_custom_vjp_equals_autodiff_of_the_forward(padding_mode, align_corners):
    image, cotangent = random_nhwc(IMAGE), random_nhwc((2, 3, 5, 3), 1)
    grid = np.random.default_rng(3).uniform(-1.4, 1.4, (2, 3, 5, 2)).astype(np.float32)
    plain = jax.jit(functools.partial(F._sample, padding_mode=padding_mode,  # noqa: SLF001
                                      align_corners=align_corners))
    custom = functools.partial(F.bilinear_sample, padding_mode=padding_mode,
                               align_corners=align_corners)
    expected = jax.vjp(plain, image, grid)[1](cotangent)
    for a, e in zip(jax.vjp(custom, image, grid)[1](cotangent), expected, strict=True):
        assert_close(a, e)


def test_chunked_forward_and_backward_equal_one_step(monkeypatch):
    """Chunks of one image (5 loop steps): the same values and gradients as the plain forward
    differentiated by autodiff."""
    monkeypatch.setattr(F, "_CHUNK_ELEMENTS", 1)
    image, cotangent = random_nhwc((5, 4, 6, 3)), random_nhwc((5, 3, 5, 3), 1)
    grid = np.random.default_rng(3).uniform(-1.4, 1.4, (5, 3, 5, 2)).astype(np.float32)
    out, vjp = jax.vjp(functools.partial(F._bilinear_sample, padding_mode="zeros",  # noqa: SLF001
                                         align_corners=False), image, grid)
    expected, expected_vjp = jax.vjp(functools.partial(
        F._sample, padding_mode="zeros", align_corners=False), image, grid)  # noqa: SLF001
    assert_close(out, expected)
    for a, e in zip(vjp(cotangent), expected_vjp(cotangent), strict=True):
        assert_close(a, e)


def test_sampling_primitives_by_hand():
    """Image 2 x 3 (rows 0..5): the point (y, x) = (0.25, 1.5) reads rows 1, 2, 4, 5 with
    weights (0.75 * 0.5, 0.75 * 0.5, 0.25 * 0.5, 0.25 * 0.5); at x0 = 2 its east neighbours
    are outside. On the ramp value = x, the dots give the slope 1 along x (times slope_x) and
    0 along y."""
    y0, x0 = jnp.array([[[0, 0]]]), jnp.array([[[1, 2]]])
    rows, inside = sampling.corner_rows(y0, x0, (2, 3))
    np.testing.assert_array_equal(rows[:, 0, 0], [[1, 2], [2, 2], [4, 5], [5, 5]])
    np.testing.assert_array_equal(inside[:, 0, 0], [[True, True], [True, False],
                                                     [True, True], [True, False]])
    dy, dx = jnp.full((1, 1, 2), 0.25), jnp.full((1, 1, 2), 0.5)
    np.testing.assert_allclose(sampling.inside_corner_weights(dy, dx, inside)[:, 0, 0],
                               [[0.375, 0.375], [0.375, 0], [0.125, 0.125], [0.125, 0]])
    ramp = jnp.broadcast_to(jnp.arange(3.0)[None, None, :, None], (1, 2, 3, 1))
    values = sampling.gather_corners(ramp, rows, inside)
    np.testing.assert_allclose(jnp.stack(values)[:, 0, 0, :, 0], [[1, 2], [2, 0], [1, 2], [2, 0]])
    dots = sampling.corner_dots(values, jnp.ones((1, 1, 2, 1)))
    np.testing.assert_allclose(sampling.grid_gradient(dots, dy, dx, 2.0, 3.0)[0, 0, 0], [3, 0])


def test_scatter_corners_of_a_later_image_by_hand():
    """The point of `test_sampling_primitives_by_hand` (x0 = 1) in the second of two 2 x 3
    images (`first_image=1`: rows shift by 6): g = 2 adds 2 * its weights to rows 7, 8, 10, 11
    of an accumulator holding ones, and nothing elsewhere."""
    y0, x0 = jnp.array([[[0]]]), jnp.array([[[1]]])
    rows, inside = sampling.corner_rows(y0, x0, (2, 3), first_image=1)
    np.testing.assert_array_equal(rows[:, 0, 0, 0], [7, 8, 10, 11])
    weights = sampling.inside_corner_weight_list(jnp.full((1, 1, 1), 0.25),
                                                 jnp.full((1, 1, 1), 0.5), inside)
    d_flat = sampling.scatter_corners(jnp.ones((12, 1)), rows, weights, jnp.full((1, 1, 1, 1), 2.0))
    expected = np.ones(12)
    expected[[7, 8, 10, 11]] += 2 * np.array([0.375, 0.375, 0.125, 0.125])
    np.testing.assert_allclose(d_flat[:, 0], expected)


@pytest.mark.parametrize("padding_mode", F.PADDING_MODES)
def test_check_grads(padding_mode):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        image = jnp.asarray(rng.standard_normal((1, 3, 4, 2)))
        grid = jnp.asarray(rng.uniform(-1.3, 1.3, (1, 2, 3, 2)))
        theta = jnp.asarray(_theta(1, 0.5).astype(np.float64))
        check_grads(lambda a, g: F.bilinear_sample(a, g, padding_mode), (image, grid), order=1,
                    modes=["rev"])
        check_grads(lambda t: F.affine_grid(t, (2, 3)), (theta,), order=1, modes=["rev"])


def test_jit_and_vmap_equal_eager():
    images, grids = random_nhwc((3, 2, 4, 5, 2)), np.random.default_rng(5).uniform(
        -1.2, 1.2, (3, 2, 3, 3, 2)).astype(np.float32)
    sample = functools.partial(F.bilinear_sample, padding_mode="reflection")
    eager = np.stack([sample(i, g) for i, g in zip(images, grids, strict=True)])
    assert_close(jax.jit(sample)(images[0], grids[0]), eager[0])
    assert_close(jax.vmap(sample)(images, grids), eager)
    grad = jax.grad(lambda i, g: jnp.sum(sample(i, g) ** 2), argnums=(0, 1))
    batched = jax.jit(jax.vmap(grad))(images, grids)
    for k in range(3):
        for a, e in zip(batched, grad(images[k], grids[k]), strict=True):
            assert_close(a[k], e)


def test_bfloat16_is_finite_and_close_to_float32():
    image = random_nhwc((2, 6, 6, 3))
    grid = F.affine_grid(jnp.asarray(_theta(2, 0.5)), (5, 7))
    expected = F.bilinear_sample(image, grid)
    out = F.bilinear_sample(jnp.asarray(image, jnp.bfloat16), grid.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(np.asarray(out, np.float32), expected, rtol=5e-2)
    d_image, d_grid = jax.grad(lambda a, g: jnp.sum(F.bilinear_sample(a, g)), argnums=(0, 1))(
        jnp.asarray(image, jnp.bfloat16), grid.astype(jnp.bfloat16))
    assert d_image.dtype == d_grid.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(d_grid, np.float32)).all()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: F.affine_grid(jnp.zeros((2, 3, 3)), (4, 4)), r"theta .*\[B, 2, 3\].*\(2, 3, 3\)"),
        (lambda: F.affine_grid(jnp.zeros((2, 6)), (4, 4)), r"theta must have rank 3.*\(2, 6\)"),
        (lambda: F.affine_grid(jnp.zeros((1, 2, 3)), (0, 4)), "out_hw"),
        (lambda: F.affine_grid(jnp.zeros((1, 2, 3)), 4), "out_hw"),
        (lambda: F.bilinear_sample(jnp.zeros((1, 4, 4)), jnp.zeros((1, 2, 2, 2))),
         r"image must have rank 4.*\(1, 4, 4\)"),
        (lambda: F.bilinear_sample(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 3))),
         r"grid .*\[B, h, w, 2\].*\(1, 2, 2, 3\)"),
        (lambda: F.bilinear_sample(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 2))),
         r"grid must have rank 4"),
        (lambda: F.bilinear_sample(jnp.zeros((2, 4, 4, 1)), jnp.zeros((3, 2, 2, 2))),
         r"batch size.*\(2, 4, 4, 1\).*\(3, 2, 2, 2\)"),
        (lambda: F.bilinear_sample(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2)), "wrap"),
         "padding_mode must be one of"),
        (lambda: F.affine_matrix(jnp.zeros((1, 6)), "shear"), "transform must be one of"),
        (lambda: F.affine_matrix(jnp.zeros((1, 6)), "translation"),
         r"\[B, 2\].*\(1, 6\)"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(("field", "value"), [("transform", "shear"), ("padding_mode", "wrap")])
def test_module_rejects_unknown_modes(field, value):
    module = SpatialTransformer(LocalizationNet(), **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


# --- the module ---------------------------------------------------------------------------------


class _MeanLocalization(nn.Module):
    """A tiny localization net: per-channel means -> Dense(4)."""

    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(4)(jnp.mean(x, axis=(1, 2))))


def _apply(module: nn.Module, x: np.ndarray, variables=None) -> tuple[jax.Array, jax.Array]:
    """Jitted init (unless `variables` are given) and apply: the output and the sown theta."""
    if variables is None:
        variables = jax.jit(module.init)(jax.random.key(0), x)
    apply = jax.jit(functools.partial(module.apply, mutable=["intermediates"]))
    out, state = apply(variables, x)
    return out, state["intermediates"]["theta"][0]


@pytest.mark.parametrize("transform", list(F.TRANSFORMS))
def test_fresh_transformer_is_the_identity(transform):
    x = random_nhwc((3, 6, 5, 4))
    out, theta = _apply(SpatialTransformer(_MeanLocalization(), transform=transform), x)
    assert_close(out, x)
    chex.assert_trees_all_close(theta, jnp.tile(jnp.eye(2, 3), (3, 1, 1)))


def test_out_hw_is_independent_of_the_input_size():
    x = random_nhwc((2, 30, 26, 3))
    module = SpatialTransformer(_MeanLocalization(), out_hw=(10, 12), padding_mode="border")
    identity = jnp.tile(jnp.eye(2, 3), (2, 1, 1))
    expected = F.bilinear_sample(x, F.affine_grid(identity, (10, 12)), "border")
    assert_close(_apply(module, x)[0], expected)


@pytest.mark.parametrize(("out_hw", "align_corners"), [(None, False), ((20, 24), True)])
def test_tutorial_stn_matches_torch(out_hw, align_corners):
    torch_stn = randomize_(ref.TutorialSTN(out_hw, align_corners), scale=0.1)
    module = SpatialTransformer(LocalizationNet(), out_hw=out_hw, align_corners=align_corners)
    variables = from_torch(module, state_dict(torch_stn))
    x = random_nhwc((2, 28, 28, 1))
    out, theta = _apply(module, x, variables)
    with torch.no_grad():
        assert_close(out, torch_to_nhwc(torch_stn(nhwc_to_torch(x))))
        assert_close(theta, torch_stn.theta(nhwc_to_torch(x)).numpy())


def test_tutorial_stn_parameter_gradients_match_torch():
    """Against torch in float64: these gradients sum ~1.5k grid-gradient terms with heavy
    cancellation, so both float32 implementations are ~1e-5 (relative) off the exact values."""
    torch_stn = randomize_(ref.TutorialSTN(), scale=0.1)
    module = SpatialTransformer(LocalizationNet())
    variables = from_torch(module, state_dict(torch_stn))
    x, cotangent = random_nhwc((2, 28, 28, 1)), random_nhwc((2, 28, 28, 1), 1)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x) * cotangent)))(variables)
    grads = grads["params"]
    torch_stn.double()
    loss = torch_stn(nhwc_to_torch(x).double()) * nhwc_to_torch(cotangent).double()
    loss.sum().backward()
    fc, loc = torch_stn.fc_loc, torch_stn.localization
    assert_close(grads["fc_loc"]["bias"], fc[2].bias.grad.numpy(), rtol=5e-5)
    assert_close(grads["fc_loc"]["kernel"], fc[2].weight.grad.numpy().T, rtol=5e-5)
    assert_close(grads["localization"]["fc_loc_0"]["bias"], fc[0].bias.grad.numpy(), rtol=5e-5)
    assert_close(grads["localization"]["conv_0"]["bias"], loc[0].bias.grad.numpy(), rtol=5e-5)


def test_bfloat16_module_is_finite():
    """A tutorial STN at its start (torch's random localization, identity fc_loc) in bf16."""
    x = random_nhwc((2, 28, 28, 1))
    module = SpatialTransformer(LocalizationNet(dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    out, theta = _apply(module, x, from_torch(module, state_dict(ref.TutorialSTN())))
    assert out.dtype == jnp.bfloat16
    assert theta.dtype == jnp.float32
    assert_close(np.asarray(out, np.float32), x, rtol=1e-2)


# --- torch interop ------------------------------------------------------------------------------


def _tutorial_state() -> dict[str, np.ndarray]:
    return state_dict(randomize_(ref.TutorialSTN()))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.pop("fc_loc.2.bias"), r"missing keys \['fc_loc.2.bias'\]"),
        (lambda sd: sd.update(extra=np.zeros(1)), r"unexpected keys \['extra'\]"),
        (lambda sd: sd.update({"fc_loc.0.weight": np.zeros((32, 91))}), "fc_loc.0.weight"),
        (lambda sd: sd.update({"localization.3.weight": np.zeros((10, 8, 3, 3))}),
         "localization.3.weight"),
    ],
)
def test_from_torch_reports_bad_keys(edit, match):
    sd = _tutorial_state()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        from_torch(SpatialTransformer(LocalizationNet()), sd)


def test_from_torch_needs_the_tutorial_localization():
    with pytest.raises(TypeError, match="LocalizationNet"):
        from_torch(SpatialTransformer(_MeanLocalization()), _tutorial_state())
