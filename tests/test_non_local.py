"""Non-local blocks: functional op and NonLocal1D/2D/3D against the PyTorch reference."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention.functional.non_local import MODES, non_local, non_local_weights
from flax_attention.interop.torch import from_torch
from flax_attention.non_local import NonLocal1D, NonLocal2D, NonLocal3D
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference.non_local import NonLocalBlock

BLOCKS = {1: NonLocal1D, 2: NonLocal2D, 3: NonLocal3D}
# Odd channel counts (5 -> inter 2) and odd sizes, so sub-sampling floors as torch's MaxPool.
SHAPES = {1: (2, 7, 5), 2: (2, 5, 4, 5), 3: (1, 2, 5, 4, 5)}


def _pair(dims: int, mode: str, seed: int = 0, cin: int | None = None, **kwargs):
    """A randomised torch block, the Flax block and its variables imported from the former."""
    cin = SHAPES[dims][-1] if cin is None else cin
    torch_block = randomize_(NonLocalBlock(cin, dims, mode, **kwargs), seed)
    block = BLOCKS[dims](mode=mode, **kwargs)
    return torch_block, block, from_torch(block, state_dict(torch_block))


def _torch_out(torch_block, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_to_nhwc(torch_block(nhwc_to_torch(x)))


# --- equivalence with the reference ---------------------------------------------------------------


def _equivalence_cases() -> list:
    """Every mode x sub_sample x bn_layer in 2-D; in 1-D and 3-D the two mixed (sub_sample,
    bn_layer) pairs by default, so each dimension still sees every value, and the rest as slow."""
    cases = []
    for dims, mode, sub_sample, bn_layer in itertools.product(
        (1, 2, 3), MODES, (True, False), (True, False)
    ):
        slow = dims != 2 and sub_sample == bn_layer
        marks = [pytest.mark.slow] if slow else []
        cases.append(pytest.param(dims, mode, sub_sample, bn_layer, marks=marks))
    return cases


@pytest.mark.parametrize(("dims", "mode", "sub_sample", "bn_layer"), _equivalence_cases())
def test_block_matches_torch(dims, mode, sub_sample, bn_layer):
    torch_block, block, variables = _pair(dims, mode, sub_sample=sub_sample, bn_layer=bn_layer)
    x = random_nhwc(SHAPES[dims], seed=1)
    assert_close(block.apply(variables, x), _torch_out(torch_block, x))


def test_training_mode_normalises_with_batch_statistics():
    torch_block, block, variables = _pair(3, "dot", seed=12)
    x = random_nhwc(SHAPES[3], seed=13)
    out, state = block.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_close(out, torch_to_nhwc(torch_block.train()(nhwc_to_torch(x))))
    assert_close(state["batch_stats"]["W_1"]["mean"], torch_block.W[1].running_mean.numpy())


@pytest.mark.parametrize("mode", MODES)
def test_sown_attention_matches_torch_map(mode):
    torch_block, block, variables = _pair(2, mode, seed=2)
    x = random_nhwc(SHAPES[2], seed=3)
    _, state = block.apply(variables, x, mutable=["intermediates"])
    with torch.no_grad():
        expected = torch_block.weights(nhwc_to_torch(x)).numpy()
    assert state["intermediates"]["attention"][0].shape == (2, 20, 4)
    assert_close(state["intermediates"]["attention"][0], expected)


@pytest.mark.parametrize(("dims", "shape", "sub_sample"), [
    (2, (2, 1, 6, 3), False),  # H = 1: only without sub-sampling
    (2, (2, 6, 1, 3), False),
    (3, (1, 1, 4, 2, 3), True),  # T = 1 is never pooled
    (1, (2, 1, 3), False),
])
def test_size_one_axes(dims, shape, sub_sample):
    torch_block, block, variables = _pair(dims, "embedded", seed=4, cin=shape[-1],
                                          sub_sample=sub_sample)
    x = random_nhwc(shape, seed=5)
    assert_close(block.apply(variables, x), _torch_out(torch_block, x))


def test_explicit_inter_channels_and_scale():
    torch_block, block, variables = _pair(2, "embedded", seed=6, cin=4, inter_channels=3,
                                          use_scale=True)
    assert variables["params"]["theta"]["kernel"].shape == (1, 1, 4, 3)
    x = random_nhwc((2, 4, 4, 4), seed=7)
    assert_close(block.apply(variables, x), _torch_out(torch_block, x))


# --- hand-checkable values ------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "bn_layer"), [*((m, True) for m in MODES), ("dot", False)])
def test_fresh_block_is_the_identity(mode, bn_layer):
    x = jnp.asarray(random_nhwc((2, 4, 6, 3)))
    block = NonLocal2D(mode=mode, bn_layer=bn_layer)
    variables = block.init(jax.random.key(0), x)
    np.testing.assert_array_equal(block.apply(variables, x), x)


def test_one_hot_keys_pick_one_value():
    theta = 50.0 * jnp.eye(3)[None]  # [1, Lq=3, Ck=3]
    phi = jnp.eye(3)[None, ::-1]  # key j is one-hot on channel 2 - j
    g = jnp.asarray([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]])
    out = non_local(theta, phi, g, "embedded")
    np.testing.assert_allclose(out, g[:, ::-1], rtol=1e-6)


def test_dot_and_concatenation_by_hand():
    theta = jnp.asarray([[[1.0], [2.0]]])  # [1, Lq=2, Ck=1]
    phi = jnp.asarray([[[3.0], [-4.0]]])  # [1, Lk=2, Ck=1]
    np.testing.assert_allclose(non_local_weights(theta, phi, "dot"),
                               [[[1.5, -2.0], [3.0, -4.0]]])
    # relu(theta_i - phi_j) / 2
    np.testing.assert_allclose(non_local_weights(theta, phi, "concatenate",
                                                   jnp.asarray([1.0, -1.0])),
                               [[[0.0, 2.5], [0.0, 3.0]]])


# --- transformations, gradients, dtypes -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_check_grads(mode):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        theta, phi, g = (jnp.asarray(rng.standard_normal(s))
                         for s in ((2, 5, 3), (2, 4, 3), (2, 4, 2)))
        if mode == "concatenate":
            w = jnp.asarray(rng.standard_normal(6))
            check_grads(lambda t, p, v, w: non_local(t, p, v, mode, w), (theta, phi, g, w),
                        order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
        else:
            check_grads(lambda t, p, v: non_local(t, p, v, mode), (theta, phi, g),
                        order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_jit_and_vmap_equal_eager():
    torch_block, block, variables = _pair(3, "concatenate", seed=8)
    x = random_nhwc(SHAPES[3], seed=9)
    chex.assert_trees_all_close(jax.jit(block.apply)(variables, x), block.apply(variables, x),
                                atol=1e-5)
    theta, phi, g = (jnp.asarray(random_nhwc(s, seed=i))
                     for i, s in enumerate(((3, 2, 6, 4), (3, 2, 5, 4), (3, 2, 5, 3))))
    batched = jax.vmap(non_local, in_axes=(0, 0, 0, None))(theta, phi, g, "embedded")
    looped = np.stack([non_local(*a, "embedded") for a in zip(theta, phi, g, strict=True)])
    chex.assert_trees_all_close(batched, looped, atol=1e-5)


@pytest.mark.parametrize("mode", ["embedded", "concatenate"])
def test_bfloat16_is_finite_and_close(mode):
    _, block, variables = _pair(2, mode, seed=10, cin=8)
    x = random_nhwc((2, 6, 6, 8), seed=11)
    expected = block.apply(variables, x)
    out = block.clone(dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(np.asarray(out, np.float32), expected, rtol=3e-2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_module_input_raises():
    key, x = jax.random.key(0), jnp.zeros((2, 4, 4, 6))
    with pytest.raises(ValueError, match=r"x must have rank 4 \(\[B, H, W, C\]\).*\(4, 4, 6\)"):
        NonLocal2D().init(key, x[0])
    with pytest.raises(ValueError, match=r"x must have rank 5 \(\[B, T, H, W, C\]\)"):
        NonLocal3D().init(key, x)
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'softmax'"):
        NonLocal1D(mode="softmax").init(key, x[0])
    with pytest.raises(ValueError, match=r"use_scale applies to mode 'embedded' only"):
        NonLocal2D(mode="dot", use_scale=True).init(key, x)
    with pytest.raises(ValueError, match=r"needs size >= 2, got x shape \(2, 1, 4, 6\)"):
        NonLocal2D().init(key, x[:, :1])
    with pytest.raises(ValueError, match=r"inter_channels must be >= 1, got 0"):
        NonLocal2D(inter_channels=0).init(key, x)


def test_bad_functional_input_raises():
    theta, phi, g = jnp.zeros((2, 6, 4)), jnp.zeros((2, 5, 4)), jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"mode must be one of"):
        non_local(theta, phi, g, "gauss")
    with pytest.raises(ValueError, match=r"theta must have rank 3 .*\(6, 4\)"):
        non_local(theta[0], phi, g)
    with pytest.raises(ValueError, match=r"theta and phi must agree in batch and channels.*"
                                         r"\(2, 6, 4\).*\(2, 5, 3\)"):
        non_local(theta, g, g)
    with pytest.raises(ValueError, match=r"phi and g must agree in batch and key positions"):
        non_local(theta, phi, g[:, :4])
    with pytest.raises(ValueError, match=r"'concatenate' needs concat_weights"):
        non_local(theta, phi, g, "concatenate")
    with pytest.raises(ValueError, match=r"theta and concat_weights must agree.*\(7,\)"):
        non_local(theta, phi, g, "concatenate", jnp.zeros(7))
    with pytest.raises(ValueError, match=r"concat_weights is for mode 'concatenate' only"):
        non_local(theta, phi, g, "dot", jnp.zeros(8))


def test_from_torch_rejects_bad_state_dicts():
    torch_block = NonLocalBlock(6, 2, "concatenate")
    sd = state_dict(torch_block)
    block = NonLocal2D(mode="concatenate")
    with pytest.raises(ValueError, match=r"missing keys \['concat_project.0.weight'\]"):
        from_torch(block, {k: v for k, v in sd.items() if not k.startswith("concat")})
    with pytest.raises(ValueError, match=r"unexpected keys \['theta.0.weight'\]"):
        from_torch(block, {**sd, "theta.0.weight": sd["theta.weight"]})
    with pytest.raises(ValueError, match=r"misshaped keys.*concat_project.0.weight: "
                                         r"expected \(6,\), got \(6, 1, 1, 1\)"):
        from_torch(block, {**sd, "concat_project.0.weight": np.zeros((6, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"missing keys \['g.bias', 'g.weight', 'phi.bias', "
                                         r"'phi.weight'\], unexpected keys \['g.0.bias'"):
        from_torch(NonLocal2D(mode="concatenate", sub_sample=False), sd)
    with pytest.raises(ValueError, match=r"missing keys \['W.bias', 'W.weight'\]"):
        from_torch(NonLocal2D(mode="concatenate", bn_layer=False), sd)


def test_block_calls_attention_fn_with_the_one_signature():
    calls = []

    def attention_fn(q, k, v, *, precision, implementation):
        calls.append((q.shape, k.shape, v.shape, precision, implementation))
        return jnp.full((*q.shape[:2], v.shape[-1]), 3.0)

    x = random_nhwc((1, 4, 6, 8))
    module = NonLocal2D(mode="dot", bn_layer=False, attention_fn=attention_fn,
                        implementation="xla", precision=jax.lax.Precision.HIGHEST)
    variables = module.init(jax.random.key(0), x)
    w = {"kernel": jnp.ones((1, 1, 4, 8)), "bias": jnp.zeros((8,))}
    out = module.apply({"params": {**variables["params"], "W": w}}, x)
    # theta `[B, H W, inter]`, phi and g sub-sampled to `[B, H W / 4, inter]`.
    assert calls[-1] == ((1, 24, 4), (1, 6, 4), (1, 6, 4), jax.lax.Precision.HIGHEST, "xla")
    assert_close(out, x + 12.0)  # W sums the four 3s
    with pytest.raises(ValueError, match="apply to the default attention_fn"):
        module.clone(mode="concatenate").init(jax.random.key(0), x)
