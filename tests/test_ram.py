"""The glimpse sensor (retina) and the Recurrent Attention Model: hand-checkable patches, a torch
crop + avg_pool2d reference (the reference repo's foveate), the two methods, gradients,
policy and baseline wiring, determinism by key, dtypes and bad input."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from jax.test_util import check_grads

from flax_attention.functional import gaussian_log_prob
from flax_attention.functional.glimpse import METHODS, retina
from flax_attention.glimpse import GlimpseSensor, to_pixels
from flax_attention.models.ram import RamOutput, RecurrentAttentionModel
from tests.helpers import assert_close, nhwc_to_torch, random_nhwc, torch_to_nhwc

IMAGE = (2, 16, 16, 3)  # g = 4, k = 3: patches of 4, 8 and 16 pixels
G, K = 4, 3
_retina = jax.jit(retina, static_argnames=("patch_size", "num_scales", "method"))


def _position_image(h: int = 16, w: int = 16) -> np.ndarray:
    """`[1, h, w, 2]`: channel 0 holds the row, channel 1 the column (+ 1, so padding shows)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols], -1)[None].astype(np.float32) + 1


def _pool(a: np.ndarray, f: int) -> np.ndarray:
    """Average-pools `[h, w, C]` by f."""
    h, w, c = a.shape
    return a.reshape(h // f, f, w // f, f, c).mean((1, 3))


def _aligned(batch: int, size: int, seed: int) -> np.ndarray:
    """Coordinates `[B]` along an axis of `size` pixels whose centres are pixel edges (integers
    in [0, size]), so that every patch of even side is pixel-aligned."""
    centres = np.random.default_rng(seed).integers(0, size + 1, batch)
    return (2 * centres / size - 1).astype(np.float32)


def _torch_foveate(images: np.ndarray, locations: np.ndarray, g: int, k: int) -> np.ndarray:
    """The reference repo's retina, written from its description: zero-pad, crop the patch of
    side g 2^i whose top-left is the centre minus half the side, avg_pool2d by 2^i."""
    x = nhwc_to_torch(images)
    h, w = x.shape[2:]
    pad = g * 2 ** (k - 1)
    x = TF.pad(x, (pad, pad, pad, pad))
    centres = np.rint((locations + 1) * np.array([w, h]) / 2).astype(int)  # (x, y) edges
    out = []
    for i in range(k):
        side = g * 2**i
        crops = [x[b, :, cy - side // 2 + pad:cy + side // 2 + pad,
                   cx - side // 2 + pad:cx + side // 2 + pad] for b, (cx, cy) in enumerate(centres)]
        out.append(torch_to_nhwc(TF.avg_pool2d(torch.stack(crops), 2**i)))
    return np.stack(out, 1)


# --- the retina -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_centre_patches_are_pooled_central_crops(method):
    """Hand-checkable: at the centre, patch 0 is the central 4x4 crop, patch 1 the 2x2-pooled
    central 8x8 crop, patch 2 the 4x4-pooled whole image."""
    image = _position_image()
    out = np.asarray(_retina(jnp.asarray(image), jnp.zeros((1, 2)), G, K,
                             method=method))[0]
    chex.assert_shape(out, (K, G, G, 2))
    np.testing.assert_allclose(out[0], image[0, 6:10, 6:10], rtol=1e-6)
    np.testing.assert_allclose(out[1], _pool(image[0, 4:12, 4:12], 2), rtol=1e-6)
    np.testing.assert_allclose(out[2], _pool(image[0], 4), rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], [7.0, 7.0])  # row 6, column 6, plus one


@pytest.mark.parametrize("method", METHODS)
def test_border_locations_zero_pad(method):
    """At the top-left corner (-1, -1) the patch's top-left quadrant lies outside: zeros; its
    bottom-right quadrant is the image's top-left corner."""
    image = _position_image()
    out = np.asarray(_retina(jnp.asarray(image), -jnp.ones((1, 2)), G, K,
                             method=method))[0]
    for i in range(K):
        half = G // 2
        np.testing.assert_array_equal(out[i, :half, :], 0.0)
        np.testing.assert_array_equal(out[i, :, :half], 0.0)
    np.testing.assert_allclose(out[0, 2:, 2:], image[0, :2, :2], rtol=1e-6)
    np.testing.assert_allclose(out[2, 2:, 2:], _pool(image[0, :8, :8], 4), rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_matches_torch_crop_and_avg_pool(method):
    """Pixel-aligned locations anywhere, borders included: the reference's crop + pool."""
    images = random_nhwc((5, 16, 20, 2))
    locations = np.stack([_aligned(5, 20, 1), _aligned(5, 16, 2)], 1)
    locations[0] = (-1.0, 1.0)  # a corner
    expected = _torch_foveate(images, locations, G, K)
    actual = _retina(jnp.asarray(images), jnp.asarray(locations), G, K,
                     method=method)
    assert_close(actual, expected)


def test_methods_agree_between_pixels():
    images = jnp.asarray(random_nhwc((3, 12, 14, 2)))
    locations = jnp.asarray(np.random.default_rng(3).uniform(-1.3, 1.3, (3, 2)), jnp.float32)
    fns = [functools.partial(retina, patch_size=3, num_scales=3, method=i)
           for i in METHODS]
    cotangent = jnp.asarray(random_nhwc((3, 3, 3, 3, 2), seed=4))
    results = []
    for fn in fns:
        out, vjp = jax.jit(lambda i, loc, fn=fn: jax.vjp(fn, i, loc))(images, locations)
        results.append((out, *vjp(cotangent)))
    for a, e in zip(*results, strict=True):
        assert_close(a, e)


def test_gradients():
    """Locations between pixel centres (the sampling is smooth there), in float64; "gather"
    has the same gradients (`test_methods_agree_between_pixels`)."""
    with jax.enable_x64(True):
        images = jnp.asarray(random_nhwc((1, 6, 6, 1)), jnp.float64)
        locations = jnp.asarray([[0.13, -0.57]], jnp.float64)
        fn = functools.partial(retina, patch_size=2, num_scales=2)
        check_grads(fn, (images, locations), order=1, modes=["rev"], eps=1e-4)


def test_jit_and_vmap_equal_eager():
    images = jnp.asarray(random_nhwc((3, *IMAGE)))
    locations = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, IMAGE[0], 2)),
                            jnp.float32)
    fn = functools.partial(retina, patch_size=G, num_scales=K)
    jitted = jnp.stack([_retina(x, loc, G, K) for x, loc in zip(images, locations, strict=True)])
    assert_close(fn(images[0], locations[0]), jitted[0])
    assert_close(jax.jit(jax.vmap(fn))(images, locations), jitted)


def test_sensor_module_and_bfloat16():
    images = jnp.asarray(random_nhwc(IMAGE))
    locations = jnp.asarray([[0.1, -0.2], [0.9, 0.4]], jnp.float32)
    sensor = GlimpseSensor(patch_size=G, num_scales=K)
    out = sensor.apply({}, images, locations)
    assert_close(out, _retina(images, locations, G, K))
    low = GlimpseSensor(G, K, dtype=jnp.bfloat16).apply({}, images, locations)
    assert low.dtype == jnp.bfloat16 and bool(jnp.isfinite(low).all())
    assert_close(low.astype(jnp.float32), out, rtol=2e-2)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_scales": 0}, "num_scales must be an int >= 1, got 0"),
    ({"patch_size": 0}, "patch_size must be an int >= 1"),
    ({"scale": 1.5}, "scale must be an int"),
    ({"patch_size": 17}, r"patch_size \(17\) must not exceed .* \(2, 16, 16, 3\)"),
    ({"locations": np.zeros((2, 3))}, r"locations must have shape \[B, 2\].*\(2, 3\)"),
    ({"locations": np.zeros((2,))}, r"locations must have shape \[B, 2\].*\(2,\)"),
    ({"locations": np.zeros((3, 2))}, r"batch size.*images \(2, 16, 16, 3\).*locations \(3, 2\)"),
    ({"images": np.zeros((16, 16, 3))}, r"images must have rank 4.*\(16, 16, 3\)"),
    ({"method": "pallas"}, "method must be one of"),
])
def test_bad_input(kwargs, match):
    args = {"images": np.zeros(IMAGE, np.float32), "locations": np.zeros((2, 2), np.float32),
            "patch_size": G, "num_scales": K, **kwargs}
    images, locations = jnp.asarray(args.pop("images")), jnp.asarray(args.pop("locations"))
    with pytest.raises(ValueError, match=match):
        retina(images, locations, **args)


def test_to_pixels():
    """(-1, -1) is the outer corner of the top-left pixel, (0, 0) the image centre."""
    np.testing.assert_allclose(to_pixels([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]], 4, 6),
                               [[-0.5, -0.5], [2.5, 1.5], [5.5, 3.5]])


# --- the model --------------------------------------------------------------------------------


SMALL = {"num_glimpses": 3, "glimpse_size": 4, "num_scales": 2, "hidden": 16,
         "what_features": 8, "where_features": 8, "num_classes": 5}


@functools.lru_cache
def _small(**overrides) -> tuple[RecurrentAttentionModel, dict]:
    model = RecurrentAttentionModel(**{**SMALL, **overrides})
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(1)}
    return model, jax.jit(model.init)(rngs, jnp.zeros((1, 16, 16, 1)))


@functools.partial(jax.jit, static_argnames="model")
def _jit_apply(model, variables, images, key):
    return model.apply(variables, images, rngs={"sample": key})


def _apply(model, variables, images, key=2):
    """The model applied (jitted: the scan runs much faster compiled than eagerly)."""
    return _jit_apply(model, variables, jnp.asarray(images), jax.random.key(key))


def test_gaussian_log_prob_closed_form():
    """At the mean: -D (log std + log(2 pi) / 2); one std away in one dimension: 1/2 less."""
    mean = jnp.asarray([[0.3, -0.2]])
    std = 0.1
    expected = -2 * (math.log(std) + 0.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(gaussian_log_prob(mean, mean, std), [expected], rtol=1e-6)
    np.testing.assert_allclose(gaussian_log_prob(mean + jnp.asarray([std, 0.0]), mean, std),
                               [expected - 0.5], rtol=1e-6)
    from scipy.stats import norm

    x = np.random.default_rng(0).normal(size=(4, 2))
    np.testing.assert_allclose(gaussian_log_prob(jnp.asarray(x), jnp.zeros(2), 0.7),
                               norm.logpdf(x, 0.0, 0.7).sum(-1), rtol=1e-5)


def test_gaussian_log_prob_bad_input():
    x = jnp.zeros((4, 2))
    for std in (0.0, -0.5, jnp.asarray([0.5, 0.0])):
        with pytest.raises(ValueError, match=r"std must be positive and finite"):
            gaussian_log_prob(x, x, std)
    with pytest.raises(ValueError, match=r"x, mean and std must broadcast.*mean \(3,\)"):
        gaussian_log_prob(x, jnp.zeros(3), 0.5)
    with pytest.raises(ValueError, match=r"x, mean and std must broadcast.*x \(\)"):
        gaussian_log_prob(jnp.zeros(()), jnp.zeros(()), 0.5)
    # a traced std is not checked (its values are unknown) and gives the same values
    np.testing.assert_allclose(jax.jit(gaussian_log_prob)(x, x, jnp.asarray(0.5)),
                               gaussian_log_prob(x, x, 0.5), rtol=1e-6)


@pytest.mark.parametrize("core", ["rnn", "lstm"])
def test_output_shapes_and_ranges(core):
    model, variables = _small(core=core)
    out = _apply(model, variables, random_nhwc((2, 16, 16, 1)))
    assert isinstance(out, RamOutput)
    chex.assert_shape([out.logits, out.log_probs, out.baselines, out.locations, out.step_logits],
                      [(2, 5), (2, 3), (2, 3), (2, 3, 2), (2, 3, 5)])
    np.testing.assert_array_equal(out.step_logits[:, -1], out.logits)
    assert not np.allclose(out.step_logits[:, 0], out.logits)  # each step classifies anew
    assert float(jnp.abs(out.locations).max()) <= 1.0
    chex.assert_tree_all_finite(out)


def test_policy_is_the_hand_set_gaussian():
    """Location weights zero, bias atanh(0.5): every mean is (0.5, 0.5), so the locations are
    0.5 + std * noise and their log-probability is the closed form at that noise."""
    model, variables = _small()
    std = model.std
    params = jax.tree.map(jnp.asarray, variables["params"])
    params["location"]["fc"]["kernel"] = jnp.zeros_like(params["location"]["fc"]["kernel"])
    params["location"]["fc"]["bias"] = jnp.full((2,), math.atanh(0.5))
    out = _apply(model, {"params": params}, random_nhwc((2, 16, 16, 1)))
    z = (np.asarray(out.locations) - 0.5) / std  # no clipping this close to 0.5
    expected = (-0.5 * z**2).sum(-1) - 2 * (math.log(std) + 0.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(out.log_probs, expected, rtol=1e-4, atol=1e-4)
    assert 0.2 < float(np.abs(z).mean()) < 3.0  # noise of the right size, not zero


@pytest.mark.parametrize("reinforce_core", [False, True])
def test_gradients_reach_the_right_networks(reinforce_core):
    """log pi trains only the location net (with `reinforce_core` also the core and glimpse
    nets), the baselines only the baseline net (a detached h), the logits everything else."""
    model, variables = _small(reinforce_core=reinforce_core)
    images = jnp.asarray(random_nhwc((2, 16, 16, 1)))

    @jax.jit
    def grad(params, weights):  # of a weighted sum of the three outputs: one compilation
        def fn(p):
            out = model.apply({"params": p}, images, rngs={"sample": jax.random.key(2)})
            sums = jnp.stack([out.log_probs.sum(), out.baselines.sum(), out.logits.sum()])
            return jnp.dot(weights, sums)

        return jax.grad(fn)(params)

    def touched(weights):
        g = grad(variables["params"], jnp.asarray(weights, jnp.float32))
        return sorted(name for name, sub in g.items()
                      if sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(sub)) > 0)

    log_probs, baselines, logits = touched([1, 0, 0]), touched([0, 1, 0]), touched([0, 0, 1])
    assert log_probs == (["core", "glimpse", "location"] if reinforce_core else ["location"])
    assert baselines == ["baseline"]
    assert logits == ["action", "core", "glimpse"]


def test_locations_depend_on_the_key_only():
    model, variables = _small()
    images = random_nhwc((2, 16, 16, 1))
    a, b = _apply(model, variables, images, 5), _apply(model, variables, images, 5)
    c = _apply(model, variables, images, 6)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a.locations, c.locations)


def test_random_locations():
    model, variables = _small(random_locations=True)
    assert "location" not in variables["params"]
    out = _apply(model, variables, random_nhwc((64, 16, 16, 1)))
    np.testing.assert_array_equal(out.log_probs, 0.0)
    locations = np.asarray(out.locations)
    assert locations.min() >= -1 and locations.max() <= 1
    assert abs(locations.mean()) < 0.1 and 0.25 < locations.var() < 0.42  # U(-1, 1): 1/3


def test_jit_vmap_sow_and_bfloat16():
    model, variables = _small()
    images = jnp.asarray(random_nhwc((2, 2, 16, 16, 1)))
    jitted = _apply(model, variables, images[0])
    eager, state = model.apply(variables, images[0], rngs={"sample": jax.random.key(2)},
                               mutable="intermediates")
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)
    np.testing.assert_array_equal(state["intermediates"]["attention"][0], eager.locations)
    batched = jax.vmap(lambda x: _jit_apply(model, variables, x, jax.random.key(2)))(images)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], batched), jitted, atol=1e-5)
    low_model = RecurrentAttentionModel(**SMALL, dtype=jnp.bfloat16)
    low = _apply(low_model, variables, images[0])
    chex.assert_tree_all_finite(low)
    assert low.logits.dtype == jnp.float32
    assert_close(low.logits, jitted.logits, rtol=0.1)  # bf16 also moves the locations


@pytest.mark.parametrize(("overrides", "images", "match"), [
    ({}, (16, 16, 1), r"images must have rank 4.*\(16, 16, 1\)"),
    ({"core": "gru"}, (1, 16, 16, 1), "core must be one of"),
    ({"num_glimpses": 0}, (1, 16, 16, 1), "num_glimpses >= 1"),
    ({"std": 0.0}, (1, 16, 16, 1), "std > 0"),
    ({"glimpse_size": 20}, (1, 16, 16, 1), r"patch_size \(20\) must not exceed"),
])
def test_model_bad_input(overrides, images, match):
    model = RecurrentAttentionModel(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match=match):
        model.init({"params": jax.random.key(0), "sample": jax.random.key(1)},
                   jnp.zeros(images))
