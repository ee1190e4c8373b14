"""ResNet / SE-ResNet networks: sizes, blocks by hand, training, and equivalence with PyTorch."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from flax_attention import models
from flax_attention.interop.torch import from_torch
from flax_attention.models.resnet import BasicBlock, Bottleneck, ResNet
from flax_attention.squeeze_excitation import SEBottleneck, SELayer
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
    torch_to_nhwc,
    train_step_losses,
)
from tests.reference import resnet as ref

SE4 = functools.partial(SELayer, reduction=4)


def _shapes(module, x):
    """The shapes of `module.init`'s variables (traced, not run)."""
    return jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))


def _param_count(module: ResNet) -> int:
    shapes = _shapes(module, jnp.zeros((1, 64, 64, 3)))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


def _imported(module, torch_module: torch.nn.Module, seed: int = 0, scale: float = 0.5):
    """`module`'s variables from `torch_module` with random weights (cheaper than `init`)."""
    return from_torch(module, state_dict(randomize_(torch_module, seed, scale)))


# --- sizes ----------------------------------------------------------------------------------------

# torchvision's parameter counts (exact) and the SENet paper's (Table 2 / 16, within 1 %).
EXACT = {"resnet18": 11_689_512, "resnet50": 25_557_032}
EXACT_SLOW = {"resnet34": 21_797_672, "resnet101": 44_549_160, "resnet152": 60_192_808}
PAPER = {"se_resnet50": 28.09e6, "se_resnext50_32x4d": 27.56e6}
PAPER_SLOW = {"se_resnet101": 49.33e6, "se_resnet152": 66.82e6}


@pytest.mark.parametrize(
    "name", [*EXACT, *(pytest.param(n, marks=pytest.mark.slow) for n in EXACT_SLOW)]
)
def test_parameter_count_equals_torchvision(name):
    assert _param_count(getattr(models, name)()) == (EXACT | EXACT_SLOW)[name]


@pytest.mark.parametrize(
    "name", [*PAPER, *(pytest.param(n, marks=pytest.mark.slow) for n in PAPER_SLOW)]
)
def test_se_parameter_count_within_one_percent_of_the_paper(name):
    expected = (PAPER | PAPER_SLOW)[name]
    assert abs(_param_count(getattr(models, name)()) - expected) <= 0.01 * expected


@pytest.mark.parametrize(
    "dilate, stride", [((False, False, False), 32), ((False, False, True), 16),
                       ((False, True, True), 8)]
)
def test_backbone_output_stride(dilate, stride):
    net = models.se_resnet50(features_only=True, replace_stride_with_dilation=dilate)
    x = jnp.zeros((2, 64, 96, 3))
    variables = _shapes(net, x)
    assert "fc" not in variables["params"]
    out, state = jax.eval_shape(
        functools.partial(net.apply, mutable=["intermediates"]), variables, x
    )
    chex.assert_shape(out, (2, 64 // stride, 96 // stride, 2048))
    stages = state["intermediates"]
    chex.assert_shape(stages["layer1"][0], (2, 16, 24, 256))
    chex.assert_shape(stages["layer4"][0], out.shape)


# --- blocks by hand -------------------------------------------------------------------------------


@pytest.mark.parametrize("attention, gate", [(None, 1.0), (SE4, 0.5)])
def test_block_with_constant_last_bn_adds_the_gated_constant(attention, gate):
    # bn3's scale 0 and bias b make the residual branch the constant b; with zero SE weights every
    # gate is sigmoid(0) = 1/2; the identity shortcut adds x: out = relu(gate * b + x).
    block = Bottleneck(4, attention=attention, use_downsample=False)
    x = random_nhwc((2, 5, 5, 16))
    variables = _imported(block, ref.Bottleneck(16, 4, reduction=4 if attention else None))
    bias = jnp.linspace(-1.0, 1.0, 16)
    params = dict(variables["params"], bn3={"scale": jnp.zeros(16), "bias": bias})
    if attention is not None:
        params["se"] = jax.tree.map(jnp.zeros_like, params["se"])
    out = jax.jit(block.apply)({**variables, "params": params}, x)
    np.testing.assert_allclose(out, np.maximum(gate * np.asarray(bias) + x, 0), rtol=1e-6)


def test_block_with_se_hook_is_the_se_bottleneck():
    x = random_nhwc((2, 6, 6, 8))
    hooked = Bottleneck(4, stride=2, attention=SE4)
    se_block = SEBottleneck(4, stride=2, reduction=4)
    torch_block = ref.Bottleneck(8, 4, stride=2, reduction=4)
    variables = _imported(se_block, torch_block)
    chex.assert_trees_all_equal(_imported(hooked, torch_block), variables)
    np.testing.assert_array_equal(
        jax.jit(hooked.apply)(variables, x), jax.jit(se_block.apply)(variables, x)
    )


def _se_block_fn():
    block = Bottleneck(4, stride=2, groups=2, base_width=32, attention=SE4)
    x = random_nhwc((2, 5, 5, 8))
    variables = _imported(block, ref.Bottleneck(8, 4, 2, 1, 2, 32, reduction=4), scale=0.3)
    return (lambda p, x: block.apply({**variables, "params": p}, x)), variables["params"], x


def test_block_jit_and_vmap_equal_eager():
    fn, params, x = _se_block_fn()
    eager = fn(params, x)
    chex.assert_trees_all_close(jax.jit(fn)(params, x), eager, rtol=1e-6, atol=1e-6)
    batched = jax.vmap(fn, in_axes=(None, 0))(params, jnp.stack([x, 2 * x]))
    chex.assert_trees_all_close(batched[0], eager, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(batched[1], fn(params, 2 * x), rtol=1e-6, atol=1e-6)


def test_block_gradients():
    fn, params, x = _se_block_fn()
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        check_grads(jax.jit(fn), (params64, jnp.asarray(x, jnp.float64)), order=1, modes=["rev"],
                    atol=1e-4, rtol=1e-4)


def test_bfloat16_is_finite_and_close():
    net = ResNet(Bottleneck, (1, 1, 1, 1), num_classes=5, attention=SE4)
    variables = _imported(net, ref.ResNet(ref.Bottleneck, [1, 1, 1, 1], 5, reduction=4), scale=0.2)
    x = random_nhwc((2, 32, 32, 3))
    full = jax.jit(net.apply)(variables, x)
    half = jax.jit(net.clone(dtype=jnp.bfloat16).apply)(variables, jnp.asarray(x, jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(half)
    assert_close(np.asarray(half, np.float32), full, rtol=5e-2)


# --- training -------------------------------------------------------------------------------------


TORCH_NETS = {
    "resnet18": lambda: ref.ResNet(ref.BasicBlock, [2, 2, 2, 2], 4),
    "se_resnet18": lambda: ref.ResNet(ref.BasicBlock, [2, 2, 2, 2], 4, reduction=16),
    "se_resnet50": lambda: ref.se_resnet50(4),
}


@pytest.mark.parametrize("name", ["se_resnet18", *(pytest.param(n, marks=pytest.mark.slow)
                                                   for n in ("resnet18", "se_resnet50"))])
def test_one_sgd_step_lowers_the_loss(name):
    # Starts from torch's default initialisation (imported: cheaper to compile than `init`).
    net = getattr(models, name)(num_classes=4)
    variables = from_torch(net, state_dict(TORCH_NETS[name]()))
    x, labels = jnp.asarray(random_nhwc((4, 32, 32, 3))), jnp.arange(4)
    before, after = train_step_losses(net, variables, x, labels)
    assert np.isfinite(before) and after < before


# --- equivalence with the reference ---------------------------------------------------------------


def _torch_out(torch_net: ref.ResNet, x: np.ndarray, features: bool = False) -> np.ndarray:
    with torch.no_grad():
        t = nhwc_to_torch(x)
        return torch_to_nhwc(torch_net.forward_features(t)) if features else torch_net(t).numpy()


def test_se_resnet50_matches_torch():
    torch_net = ref.se_resnet50(num_classes=10)
    net = models.se_resnet50(num_classes=10)
    variables = _imported(net, torch_net, scale=0.1)
    x = random_nhwc((2, 64, 64, 3), seed=1)
    logits = jax.jit(net.apply)(variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    assert_close(logits, _torch_out(torch_net, x))


TORCH_BLOCKS = {BasicBlock: ref.BasicBlock, Bottleneck: ref.Bottleneck}
SMALL = [
    pytest.param(BasicBlock, None, (1, 1, 1, 1), {}, False, id="basic"),
    pytest.param(BasicBlock, 4, (1, 1, 1, 2), dict(replace_stride_with_dilation=(0, 0, 1)), True,
                 id="se-basic-os16-features"),
    pytest.param(Bottleneck, 4, (1, 1, 2, 2), dict(groups=8, width_per_group=4,
                                                   replace_stride_with_dilation=(0, 1, 1)),
                 False, id="se-resnext-os8"),
]


@pytest.mark.parametrize("block_cls, reduction, stages, common, features_only", SMALL)
def test_small_networks_match_torch(block_cls, reduction, stages, common, features_only):
    torch_net = ref.ResNet(TORCH_BLOCKS[block_cls], list(stages), 5, reduction=reduction, **common)
    sd = state_dict(randomize_(torch_net, seed=2, scale=0.2))
    if features_only:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    attention = reduction and functools.partial(SELayer, reduction=reduction)
    net = ResNet(block_cls, stages, 5, attention=attention, features_only=features_only, **common)
    x = random_nhwc((2, 40, 48, 3), seed=3)
    assert_close(jax.jit(net.apply)(from_torch(net, sd), x),
                 _torch_out(torch_net, x, features_only))


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_rank():
    net = models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match=r"x must have rank 4.*\(2, 32, 3\)"):
        _shapes(net, np.zeros((2, 32, 3), np.float32))


@pytest.mark.parametrize("fields", [dict(stage_sizes=(2, 2, 2)), dict(stage_sizes=(1, 0, 1, 1)),
                                    dict(replace_stride_with_dilation=(True,))])
def test_bad_stage_configuration(fields):
    net = ResNet(BasicBlock, **({"stage_sizes": (1, 1, 1, 1)} | fields))
    with pytest.raises(ValueError, match="stage_sizes .* replace_stride_with_dilation"):
        _shapes(net, np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("block, match", [
    (BasicBlock(8, groups=2), "groups=1 and base_width=64"),
    (BasicBlock(8, stride=2, use_downsample=False), r"use_downsample=False .*\(1, 8, 8, 8\)"),
    (Bottleneck(4, dilation=0), "dilation must be >= 1"),
    (BasicBlock(8, first_dilation=0), "first_dilation must be >= 1, got 0"),
])
def test_bad_block_fields(block, match):
    with pytest.raises(ValueError, match=match):
        _shapes(block, np.zeros((1, 8, 8, 8), np.float32))


def test_from_torch_reports_missing_and_misshaped_keys():
    sd = state_dict(ref.ResNet(ref.BasicBlock, [1, 1, 1, 1], num_classes=5, reduction=4))
    net = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=5, attention=SE4)
    missing = {k: v for k, v in sd.items() if k != "layer2.0.se.fc.0.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['layer2.0.se.fc.0.weight'\]"):
        from_torch(net, missing)
    with pytest.raises(ValueError, match=r"misshaped keys.*fc.weight: expected \(512, 7\)"):
        from_torch(net.clone(num_classes=7), sd)
    with pytest.raises(ValueError, match=r"unexpected keys \['fc.bias', 'fc.weight'\]"):
        from_torch(net.clone(features_only=True), sd)


def test_block_matches_torch_and_stride_one_needs_use_downsample():
    torch_block = randomize_(ref.Bottleneck(16, 4, reduction=4))
    block = Bottleneck(4, attention=SE4, use_downsample=False)
    x = random_nhwc((2, 6, 6, 16))
    with torch.no_grad():
        expected = torch_to_nhwc(torch_block(nhwc_to_torch(x)))
    assert_close(jax.jit(block.apply)(from_torch(block, state_dict(torch_block)), x), expected)
    with pytest.raises(ValueError, match="use_downsample"):
        from_torch(block.clone(use_downsample=None), state_dict(torch_block))
