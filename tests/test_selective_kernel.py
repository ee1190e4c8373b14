"""Selective Kernel: functional ops and SelectiveKernel against the timm-form PyTorch reference."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.functional import selective_kernel as F
from flax_attention.interop.torch import from_torch
from flax_attention.layers import make_divisible
from flax_attention.resnet_blocks import BasicBlock
from flax_attention.selective_kernel import SelectiveKernel, SelectiveKernelAttn
from tests.helpers import (
    assert_close,
    check_bfloat16_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
)
from tests.reference import selective_kernel as ref

_SHAPE = (2, 8, 9, 32)


def _pair(seed: int = 0, **kwargs):
    """The Flax module, its variables loaded from a randomized reference, and the reference."""
    torch_sk = randomize_(ref.SelectiveKernel(kwargs.pop("in_channels", 32), **kwargs), seed)
    if isinstance(kwargs.get("kernel_size"), list):
        kwargs["kernel_size"] = tuple(kwargs["kernel_size"])
    module = SelectiveKernel(**kwargs)
    return module, from_torch(module, state_dict(torch_sk)), torch_sk


# --- hand-checkable values ------------------------------------------------------------------------


def test_make_divisible_is_timms():
    assert make_divisible(64 / 16) == 8  # SK's default at 64 channels: at least the divisor
    assert make_divisible(256 / 16) == 16
    assert make_divisible(64 / 8, 16) == 16  # skresnet18's attention width
    assert make_divisible(100 * 0.1, 8) == 16  # 8 would lose more than 10%: one more divisor
    assert make_divisible(512 / 24, 8, round_limit=0.0) == 24


def test_weights_of_empty_logits_are_empty():
    chex.assert_shape(F.selective_kernel_weights(jnp.zeros((0, 6)), 2), (0, 2, 3))
    chex.assert_shape(F.selective_kernel_weights(jnp.zeros((2, 0)), 2), (2, 2, 0))


def test_weights_by_hand():
    # logits of path 0 and path 1 for one channel: 0 and log 3 -> softmax [1/4, 3/4].
    logits = jnp.asarray([[0.0, 0.0, np.log(3.0), 0.0]])  # [B=1, P*C = 2*2], p-major
    expected = np.array([[[0.25, 0.5], [0.75, 0.5]]])
    np.testing.assert_allclose(F.selective_kernel_weights(logits, 2), expected, rtol=1e-6)
    paths = jnp.stack([jnp.full((1, 2, 3, 2), 4.0), jnp.full((1, 2, 3, 2), 8.0)], axis=1)
    out = F.selective_kernel_select(paths, jnp.asarray(expected, jnp.float32))
    np.testing.assert_allclose(out, np.broadcast_to([7.0, 6.0], (1, 2, 3, 2)), rtol=1e-6)


def test_fuse_and_split_by_hand():
    paths = jnp.arange(2 * 3 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 3, 2, 2, 1)
    np.testing.assert_allclose(F.selective_kernel_fuse(paths), paths.sum(1).mean((1, 2)))
    x = jnp.arange(12.0).reshape(1, 1, 1, 12)
    parts = F.selective_kernel_split(x, 3)
    assert [p.ravel().tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_zero_select_weights_average_the_paths():
    module, variables, _ = _pair()
    params = dict(variables["params"], attn=dict(variables["params"]["attn"]))
    params["attn"]["fc_select"] = {"kernel": jnp.zeros_like(
        params["attn"]["fc_select"]["kernel"])}
    x = random_nhwc(_SHAPE, seed=1)
    out, state = module.apply({**variables, "params": params}, x, capture_intermediates=True,
                              mutable=["intermediates"])
    found = state["intermediates"]
    np.testing.assert_array_equal(found["attention"][0], np.full((2, 2, 32), 0.5))
    (path0,), (path1,) = found["paths_0"]["__call__"], found["paths_1"]["__call__"]
    assert_close(out, 0.5 * (path0 + path1))


# --- equivalence with the reference ---------------------------------------------------------------

CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"stride": 2, "out_channels": 48}, id="stride2-out48"),
    pytest.param({"kernel_size": [3, 5, 7], "split_input": False, "groups": 4}, id="3paths-groups"),
    pytest.param({"kernel_size": 5, "keep_3x3": False, "stride": 3, "dilation": 2},
                 id="5x5-stride3-dilation2"),
    pytest.param({"rd_channels": 12, "rd_ratio": 0.5}, id="rd_channels"),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_matches_torch(kwargs):
    module, variables, torch_sk = _pair(**kwargs)
    x = random_nhwc(_SHAPE, seed=1)
    out, state = module.apply(variables, x, mutable=["intermediates"])
    with torch.no_grad():
        expected = torch_to_nhwc(torch_sk(nhwc_to_torch(x)))
        weights = torch_sk.path_weights(nhwc_to_torch(x)).numpy()
    assert_close(out, expected)
    (sown,) = state["intermediates"]["attention"]
    assert sown.dtype == jnp.float32 and sown.shape == weights.shape
    assert_close(sown, weights)
    np.testing.assert_allclose(sown.sum(1), 1.0, rtol=1e-6)


def test_input_gradients_match_torch():
    module, variables, torch_sk = _pair(seed=3, stride=2)
    x = random_nhwc(_SHAPE, seed=4)
    cotangent = random_nhwc((2, 4, 5, 32), seed=5)
    grad = jax.jit(lambda x, ct: jax.vjp(lambda x: module.apply(variables, x), x)[1](ct)[0])(
        jnp.asarray(x), jnp.asarray(cotangent))
    tx = nhwc_to_torch(x).requires_grad_(True)
    torch_sk(tx).backward(nhwc_to_torch(cotangent))
    assert_close(grad, torch_to_nhwc(tx.grad), rtol=2e-5)


def test_training_mode_matches_torch_and_updates_statistics():
    module, variables, torch_sk = _pair(seed=6)
    x = random_nhwc(_SHAPE, seed=7)
    out, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    expected = torch_to_nhwc(torch_sk.train()(nhwc_to_torch(x)))
    assert_close(out, expected, rtol=2e-5)
    stats = state["batch_stats"]
    assert_close(stats["paths_1"]["bn"]["mean"], torch_sk.paths[1].bn.running_mean.numpy())
    assert_close(stats["attn"]["bn"]["mean"], torch_sk.attn.bn.running_mean.numpy())


def test_attn_alone_matches_torch():
    torch_attn = randomize_(ref.SelectiveKernelAttn(16, num_paths=3, attn_channels=8), 8)
    module = SelectiveKernelAttn(num_paths=3, attn_channels=8)
    variables = from_torch(module, state_dict(torch_attn))
    paths = random_nhwc((2, 3, 4, 5, 16), seed=9)
    with torch.no_grad():
        expected = torch_attn(torch.from_numpy(np.moveaxis(paths, -1, 2).copy())).flatten(2)
    assert_close(module.apply(variables, paths), expected.numpy())


@pytest.mark.parametrize(("stride", "dilation", "padding", "groups", "kernel_hw"),
                         [(1, 2, 2, 1, (3, 3)), (2, 1, 1, 4, (3, 3)), (3, 2, 3, 2, (3, 3)),
                          (1, 1, 1, 2, (3, 1))])
def test_branch_conv_tap_gradients_equal_xlas(stride, dilation, padding, groups, kernel_hw):
    x = jnp.asarray(random_nhwc((2, 9, 11, 8), seed=14))
    kernel = jnp.asarray(random_nhwc((*kernel_hw, 8 // groups, 12), seed=15))

    def grads(implementation):
        def loss(x, kernel):
            return (F.branch_conv(x, kernel, stride=stride, dilation=dilation, padding=padding,
                                  groups=groups, implementation=implementation) ** 2).sum()
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, kernel)

    (taps_loss, taps), (xla_loss, xla) = grads(None), grads("xla")
    assert float(taps_loss) == float(xla_loss)
    for a, b in zip(taps, xla, strict=True):
        assert_close(a, b)


def test_branch_conv_kernel_gradient_over_chunks_of_the_batch(monkeypatch):
    """One image a step of the kernel gradient's loop (3 steps): XLA's gradients."""
    monkeypatch.setattr(F, "_KERNEL_GRAD_CHUNK_ELEMENTS", 1)
    x = jnp.asarray(random_nhwc((3, 7, 6, 4), seed=16))
    kernel = jnp.asarray(random_nhwc((3, 3, 2, 6), seed=17))

    def grads(implementation):
        return jax.grad(lambda k: (F.branch_conv(x, k, dilation=2, padding=2, groups=2,
                                                 implementation=implementation) ** 2).sum())(kernel)

    assert_close(grads(None), grads("xla"))


# --- in a block, transformations, dtypes ----------------------------------------------------------


def test_works_in_a_resnet_attention_slot():
    block = BasicBlock(32, attention=functools.partial(SelectiveKernel))
    x = jax.ShapeDtypeStruct(_SHAPE, jnp.float32)
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
    assert set(variables["params"]["se"]) == {"paths_0", "paths_1", "attn"}
    assert jax.eval_shape(block.apply, variables, x).shape == _SHAPE


def test_jit_vmap_grad():
    module, variables, _ = _pair(seed=10, in_channels=16)
    x = jnp.asarray(random_nhwc((2, 5, 6, 16), seed=11))
    eager = module.apply(variables, x)

    jitted = jax.jit(module.apply)(variables, x)
    chex.assert_trees_all_close(jitted, eager, atol=1e-5)
    batched = jax.jit(jax.vmap(lambda xi: module.apply(variables, xi[None])[0]))(x)
    chex.assert_trees_all_close(batched, eager, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p, x: module.apply({**variables, "params": p}, x).sum(),
                             argnums=(0, 1)))(variables["params"], x)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[0]["attn"]["fc_select"]["kernel"]).max()) > 0


def test_bfloat16_is_finite_and_close():
    module, variables, _ = _pair(seed=12, in_channels=16)
    check_bfloat16_close(module, random_nhwc((2, 5, 6, 16), seed=13), variables, rtol=5e-2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(8, 9, 32\)"):
        SelectiveKernel().init(key, jnp.zeros(_SHAPE[1:]))
    with pytest.raises(ValueError, match=r"x channels \(33\) must be divisible by num_paths"):
        SelectiveKernel().init(key, jnp.zeros((1, 4, 4, 33)))
    with pytest.raises(ValueError, match=r"kernel_size must be odd sizes >= 3, got \(3, 4\)"):
        SelectiveKernel(kernel_size=(3, 4)).init(key, jnp.zeros(_SHAPE))
    with pytest.raises(ValueError, match=r"path input channels \(16\) must be divisible by groups"):
        SelectiveKernel(groups=3, out_channels=30).init(key, jnp.zeros(_SHAPE))
    with pytest.raises(ValueError, match=r"paths must have rank 5.*\(2, 4, 4, 8\)"):
        F.selective_kernel_fuse(jnp.zeros((2, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"paths and weights must agree in batch, paths and chan"):
        F.selective_kernel_select(jnp.zeros((2, 2, 4, 4, 8)), jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match=r"logits features \(7\) must be divisible by num_paths"):
        F.selective_kernel_weights(jnp.zeros((2, 7)), 2)
    with pytest.raises(ValueError, match=r"implementation must be one of .* got 'cudnn'"):
        F.branch_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 8, 8)), implementation="cudnn")
    with pytest.raises(ValueError, match=r"x and kernel must agree in input channels"):
        F.branch_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"kernel must not be empty.*\(0, 0, 8, 8\)"):
        F.branch_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((0, 0, 8, 8)))
    with pytest.raises(ValueError, match=r"x \(1, 4, 4, 8\) is too small for kernel \(5, 5,"):
        F.branch_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((5, 5, 8, 8)))
    with pytest.raises(ValueError, match=r"stride must be an integer >= 1, got 0"):
        F.branch_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 8, 8)), stride=0)
    with pytest.raises(ValueError, match=r"kernel output channels \(6\) must be divisible by gr"):
        F.branch_conv(jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 2, 6)), groups=4)
    with pytest.raises(ValueError, match=r"num_paths must be an integer >= 1, got 0"):
        F.selective_kernel_weights(jnp.zeros((2, 8)), 0)
    with pytest.raises(ValueError, match=r"paths must have num_paths \(2\) entries on axis 1"):
        SelectiveKernelAttn().init(key, jnp.zeros((1, 3, 2, 2, 8)))


def test_from_torch_rejects_bad_state_dicts():
    sd = state_dict(ref.SelectiveKernel(32))
    with pytest.raises(ValueError, match=r"missing keys \['attn.fc_select.weight'\]"):
        from_torch(SelectiveKernel(), {k: v for k, v in sd.items() if "fc_select" not in k})
    with pytest.raises(ValueError, match=r"unexpected keys \['paths.2.conv.weight'\]"):
        from_torch(SelectiveKernel(), {**sd, "paths.2.conv.weight": sd["paths.0.conv.weight"]})
    with pytest.raises(ValueError, match=r"misshaped keys.*attn.fc_reduce.weight"):
        from_torch(SelectiveKernel(), {**sd, "attn.fc_reduce.weight": np.zeros((8, 32, 3, 3))})
    with pytest.raises(ValueError, match=r"misshaped keys.*paths.0.conv.weight"):
        from_torch(SelectiveKernel(out_channels=48), sd)


def test_select_accepts_a_list_of_paths():
    paths = jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 6))
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 3, 6)), axis=1)
    listed = F.selective_kernel_select([paths[:, i] for i in range(3)], weights)
    np.testing.assert_array_equal(listed, F.selective_kernel_select(paths, weights))
    with pytest.raises(ValueError, match="paths"):
        F.selective_kernel_select([paths[:, 0], paths[:, 1, :3]], weights)
