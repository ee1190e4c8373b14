"""timm's attention ResNets (`flax_attention.models.timm_resnet`): parameter counts equal to
timm's, outputs equal to the PyTorch reference with timm's keys (`tests/reference/timm_resnet.py`)
after `from_torch`, and the pieces (SEModule, the deep stems, the avg-pool shortcut) by hand."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_attention.interop.torch import from_torch
from flax_attention.models import ResNet, SelectiveKernelBasic, SkresnetBasic, registry
from flax_attention.models.resnet import stem_widths
from flax_attention.resnet_blocks import BasicBlock, Bottleneck, avg_down_pool
from flax_attention.squeeze_excitation import SEModule
from tests.helpers import (
    assert_close,
    nhwc_to_torch,
    random_nhwc,
    randomize_,
    state_dict,
)
from tests.reference import resnet as resnet_ref
from tests.reference import timm_resnet as ref
from tests.test_precision import assert_precision_reaches_every_layer

# name: (exact count, timm's rounded count in millions). The exact counts are those of
# `tests/reference/timm_resnet.py` built with timm's configuration (`ref.create(name)`, 1000
# classes); the rounded ones are the `param_count` column of timm's `results/results-imagenet.csv`
# (pytorch-image-models, main branch), None where timm publishes no weights for the name.
COUNTS = {
    "seresnet18": (11_779_624, None),
    "seresnet34": (21_960_416, None),
    "seresnet50": (28_088_024, 28.09),
    "seresnet50t": (28_104_720, None),
    "resnet50d": (25_576_264, 25.58),
    "ecaresnet26t": (16_011_916, 16.01),
    "ecaresnet50d": (25_576_350, 25.58),
    "ecaresnet50t": (25_573_814, 25.57),
    "cbam_resnet50": (28_073_576, None),
    "gcresnet50t": (25_897_080, 25.90),
    "skresnet18": (11_958_056, 11.96),
    "skresnet34": (22_282_376, 22.28),
}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _torch_out(torch_net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_net(nhwc_to_torch(x)).numpy()


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_count_equals_timms(name):
    shapes = jax.eval_shape(registry.create(name).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))
    exact, rounded = COUNTS[name]
    assert _count(shapes["params"]) == exact
    if rounded is not None:
        assert round(exact / 1e6, 2) == rounded


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_reference_parameter_count(name):
    assert ref.count(ref.create(name)) == COUNTS[name][0]


def _check_matches_torch(name: str, stages=None, shape=(1, 57, 61, 3), scale=0.2):
    torch_net = ref.create(name, stages, num_classes=5)
    net = registry.create(name, num_classes=5, **({"stage_sizes": stages} if stages else {}))
    variables = from_torch(net, state_dict(randomize_(torch_net, seed=1, scale=scale)))
    x = random_nhwc(shape, seed=2)
    logits = jax.jit(net.apply)(variables, x)
    chex.assert_shape(logits, (shape[0], 5))
    assert_close(logits, _torch_out(torch_net, x))


@pytest.mark.parametrize("name", ["seresnet50", "ecaresnet50d", "cbam_resnet50", "skresnet18",
                                  "gcresnet50t"])
def test_one_block_per_stage_matches_torch(name):
    # The same stems, shortcuts and attention as the full networks, one block a stage; odd sizes
    # (57 x 61) so that the avg-pool shortcut pools a border window of one pixel. The tiered stem
    # differs from the deep one only in its widths (`test_stem_widths_are_timms`).
    _check_matches_torch(name, stages=(1, 1, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_full_network_matches_torch(name):
    _check_matches_torch(name, shape=(1, 64, 64, 3), scale=0.1)


@pytest.mark.parametrize("name", ["seresnet50", "ecaresnet50d", "cbam_resnet50", "skresnet18",
                                  "gcresnet50t"])
def test_precision_reaches_every_layer(name):
    net = registry.create(name, num_classes=3, stage_sizes=(1, 1, 1, 1))
    assert_precision_reaches_every_layer(net, jnp.zeros((1, 32, 32, 3)))


# --- the pieces by hand ---------------------------------------------------------------------------


def test_se_module_with_zero_weights_halves_the_input():
    x = random_nhwc((2, 3, 3, 64), seed=0)
    module = SEModule()
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    chex.assert_shape(variables["params"]["fc1"]["kernel"], (1, 1, 64, 8))  # R = max(8, 64/16)
    assert_close(module.apply(variables, x), 0.5 * x)


@pytest.mark.parametrize(("kwargs", "torch_kwargs"), [
    ({}, {}),
    ({"add_maxpool": True, "act_layer": "silu", "gate_layer": "hard_sigmoid"},
     {"add_maxpool": True, "act_layer": torch.nn.SiLU, "gate_layer": torch.nn.Hardsigmoid}),
], ids=["default", "maxpool-silu-hard_sigmoid"])
def test_se_module_matches_torch(kwargs, torch_kwargs):
    torch_module = randomize_(ref.SEModule(48, rd_ratio=0.25, rd_divisor=4, **torch_kwargs))
    module = SEModule(rd_ratio=0.25, rd_divisor=4, **kwargs)
    x = random_nhwc((2, 5, 4, 48), seed=3)
    out = module.apply(from_torch(module, state_dict(torch_module)), x)
    assert_close(out, np.moveaxis(_torch_out(torch_module, x), 1, -1))


def test_avg_down_pool_averages_the_pixels_inside_each_window():
    x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    expected = [[(1 + 2 + 4 + 5) / 4, (3 + 6) / 2], [(7 + 8) / 2, 9]]
    np.testing.assert_allclose(avg_down_pool(x, 2)[0, :, :, 0], expected)
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    x = random_nhwc((1, 7, 4, 2), seed=4)
    assert_close(avg_down_pool(jnp.asarray(x), 2), np.moveaxis(_torch_out(pool, x), 1, -1))
    assert avg_down_pool(x, 1) is x


@pytest.mark.parametrize("stem_type, widths", [("", (64,)), ("deep", (32, 32, 64)),
                                               ("deep_tiered", (24, 32, 64))])
def test_stem_widths_are_timms(stem_type, widths):
    assert stem_widths(ResNet(Bottleneck, (1,), stem_type=stem_type, stem_width=32)) == widths


def test_bad_stem_type_and_avg_down_with_dilation_raise():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="stem_type"):
        net = ResNet(Bottleneck, (1,), replace_stride_with_dilation=(), stem_type="wide")
        jax.eval_shape(net.init, jax.random.key(0), x)
    net = ResNet(Bottleneck, (1, 1), replace_stride_with_dilation=(True,), avg_down=True)
    with pytest.raises(ValueError, match="avg_down"):
        jax.eval_shape(net.init, jax.random.key(0), x)


def test_registry_lists_the_timm_names():
    assert set(COUNTS) <= set(registry.list_models())


@pytest.mark.parametrize(("block", "sk_kwargs", "width"), [
    (SelectiveKernelBasic, None, 8),  # timm's SelectiveKernel defaults: 1/16, divisor 8
    (SkresnetBasic, {"rd_ratio": 1 / 8, "rd_divisor": 16, "split_input": True}, 16),
])
def test_selective_kernel_blocks_have_timms_defaults(block, sk_kwargs, width):
    torch_block = randomize_(ref.SelectiveKernelBasic(64, 64, sk_kwargs=sk_kwargs), seed=1)
    module = block(64, use_downsample=False)
    variables = from_torch(module, state_dict(torch_block))
    assert variables["params"]["conv1"]["attn"]["fc_reduce"]["kernel"].shape[-1] == width
    x = random_nhwc((2, 9, 10, 64), seed=2)
    expected = np.moveaxis(_torch_out(torch_block, x), 1, -1)
    assert_close(jax.jit(module.apply)(variables, x), expected)


@pytest.mark.parametrize("block", [SelectiveKernelBasic, BasicBlock])
def test_first_block_of_a_dilated_stage_dilates_as_timm(block):
    """timm's `make_blocks`: the first block of a stage that dilates (output stride 16 or 8)
    keeps the previous dilation in its first 3x3 convolution and takes the new one in its
    second; here 1 and 2, which differ from the both-1 or both-2 readings."""
    torch_cls = ref.SelectiveKernelBasic if block is SelectiveKernelBasic else resnet_ref.BasicBlock
    torch_block = randomize_(torch_cls(16, 16, dilation=2, first_dilation=1), seed=1)
    module = block(16, dilation=2, first_dilation=1, use_downsample=False)
    variables = from_torch(module, state_dict(torch_block))
    x = random_nhwc((2, 9, 10, 16), seed=2)
    expected = np.moveaxis(_torch_out(torch_block, x), 1, -1)
    assert_close(jax.jit(module.apply)(variables, x), expected)


def test_last_batchnorm_of_every_block_starts_at_zero_as_timms():
    """timm's `zero_init_last`: the scale of each residual branch's last BN starts at zero in
    its ResNets and byobnet (a fresh block is its shortcut), not in its sknet.py ResNets nor in
    torchvision's."""
    from flax_attention.models.byobnet import ByobBottleneck
    from flax_attention.models.resnet import block_specs

    for name in COUNTS:
        net = registry.create(name)
        fields = ([f for _, _, f in net.blocks()] if name == "gcresnet50t"
                  else [spec.kwargs for spec in block_specs(net)])
        assert {f["zero_init_last"] for f in fields} == {not name.startswith("skresnet")}
    assert registry.create("resnet50").zero_init_last is False
    x = jnp.ones((1, 4, 4, 16))
    for block, last in [(BasicBlock(16, zero_init_last=True), ("bn2",)),
                        (Bottleneck(4, zero_init_last=True), ("bn3",)),
                        (ByobBottleneck(16, zero_init_last=True), ("conv3_1x1", "bn"))]:
        variables = block.init(jax.random.key(0), x)
        norm = variables["params"]
        for key in last:
            norm = norm[key]
        assert bool(jnp.all(norm["scale"] == 0))
        assert bool(jnp.all(block.apply(variables, x) == x))
