"""The reference repositories' whole networks load from their checkpoints: each pure-torch twin
in `tests/reference/` (the repository's exact parameter names and structure) gets random weights
(non-zero residual scales, BatchNorm running statistics away from their defaults), is saved with
`torch.save` and loaded back with `torch.load` as a user would, converted by
`from_torch(models.create(name, ...), state_dict)`, and gives the reference's outputs within
fp32 tolerance on the same input. Depths are the smallest the references allow; the full
configurations run under `slow`."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flax_attention.interop.torch import from_torch
from flax_attention.models import registry
from tests.helpers import assert_close, nhwc_to_torch, random_nhwc, randomize_, torch_to_nhwc
from tests.reference import cifar_resnet as cifar_ref
from tests.reference import ram as ram_ref
from tests.reference import residual_attention_port as port_ref
from tests.reference import segmentation as seg_ref
from tests.reference import spatial_transformer as stn_ref


def _saved_and_loaded(torch_net: torch.nn.Module, tmp_path, scale: float = 0.2) -> dict:
    """Randomises `torch_net` (normal weights of std `scale`), saves its state_dict to a file
    and loads it back."""
    randomize_(torch_net, scale=scale)
    path = tmp_path / "checkpoint.pth"
    torch.save(torch_net.state_dict(), path)
    return torch.load(path, weights_only=True)


def _create(name: str, stage_sizes=None, **overrides):
    """`registry.create(name)`, with the backbone's `stage_sizes` replaced when given."""
    net = registry.create(name, **overrides)
    if stage_sizes is None:
        return net
    return net.clone(backbone=functools.partial(net.backbone, stage_sizes=stage_sizes))


def _upsampled(t: torch.Tensor, size) -> np.ndarray:
    return torch_to_nhwc(F.interpolate(t, size, mode="bilinear", align_corners=True))


def _check_ccnet(layers, side: int, tmp_path) -> None:
    torch_net = seg_ref.CCNet(layers, num_classes=5, recurrence=2)
    sd = _saved_and_loaded(torch_net, tmp_path)
    net = _create("ccnet_deep_resnet101", None if layers == (3, 4, 23, 3) else layers,
                  num_classes=5, aux=True)
    variables = from_torch(net, sd)
    x = random_nhwc((1, side, side, 3), seed=1)
    logits, dsn = jax.jit(net.apply)(variables, x)
    with torch.no_grad():
        expected, expected_dsn = torch_net(nhwc_to_torch(x))
    assert_close(logits, _upsampled(expected, (side, side)), rtol=1e-4)
    assert_close(dsn, _upsampled(expected_dsn, (side, side)), rtol=1e-4)


def test_ccnet_deep_resnet101_loads_speedinghzl_ccnet(tmp_path):
    """speedinghzl/CCNet's segmenter (networks/ccnet.py `ResNet`, recurrence 2) with one block
    per stage; an even input side exercises the ceil-mode max-pool."""
    _check_ccnet((1, 1, 1, 1), 32, tmp_path)


@pytest.mark.slow
def test_ccnet_deep_resnet101_loads_seg_model_whole(tmp_path):
    """`Seg_Model`'s own depth (3, 4, 23, 3)."""
    _check_ccnet((3, 4, 23, 3), 34, tmp_path)


def _check_danet(name: str, layers, tmp_path) -> None:
    torch_net = seg_ref.DANet(layers, nclass=4)
    sd = _saved_and_loaded(torch_net, tmp_path)
    net = _create(name, None if layers in ((3, 4, 6, 3), (3, 4, 23, 3)) else layers,
                  num_classes=4, aux=True)
    variables = from_torch(net, sd)
    x = random_nhwc((1, 24, 24, 3), seed=2)
    outputs = jax.jit(net.apply)(variables, x)
    with torch.no_grad():
        expected = torch_net(nhwc_to_torch(x))
    for actual, want in zip(outputs, expected, strict=True):
        assert_close(actual, torch_to_nhwc(want), rtol=1e-4)


def test_danet_deep_resnet50_loads_junfu1115_danet(tmp_path):
    """junfu1115/DANet's `DANet` on the encoding ResNet (deep stem), one block per stage."""
    _check_danet("danet_deep_resnet50", (1, 1, 1, 1), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("danet_deep_resnet50", (3, 4, 6, 3)),
                                          ("danet_deep_resnet101", (3, 4, 23, 3))])
def test_danet_loads_whole(name, layers, tmp_path):
    """`get_danet(backbone="resnet50" / "resnet101")`'s own depths."""
    _check_danet(name, layers, tmp_path)


def test_ccnet_refuses_a_danet_checkpoint(tmp_path):
    sd = _saved_and_loaded(seg_ref.DANet((1, 1, 1, 1), nclass=4), tmp_path)
    with pytest.raises(ValueError, match="pretrained"):
        from_torch(_create("ccnet_deep_resnet101", (1, 1, 1, 1), num_classes=4), sd)


def _check_cifar_se_resnet(name: str, n_size: int, tmp_path) -> None:
    torch_net = cifar_ref.CifarSEResNet(n_size, num_classes=10)
    sd = _saved_and_loaded(torch_net, tmp_path)
    net = registry.create(name)
    x = random_nhwc((2, 8, 8, 3), seed=3)
    with torch.no_grad():
        expected = torch_net(nhwc_to_torch(x)).numpy()
    assert_close(jax.jit(net.apply)(from_torch(net, sd), x), expected, rtol=1e-4)


def test_se_resnet20_loads_senet_pytorch_cifar(tmp_path):
    """senet.pytorch's `se_resnet20()` (`CifarSEResNet(CifarSEBasicBlock, 3)`, 10 classes)."""
    _check_cifar_se_resnet("se_resnet20", 3, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, n_size", [("se_resnet32", 5), ("se_resnet56", 9),
                                          ("se_resnet110", 18)])
def test_cifar_se_resnets_load(name, n_size, tmp_path):
    _check_cifar_se_resnet(name, n_size, tmp_path)


def test_stn_tutorial_net_loads_the_tutorials_net(tmp_path):
    """The PyTorch STN tutorial's `Net` (28 x 28 x 1 MNIST), whole: localization, fc_loc,
    conv1, conv2, fc1, fc2; a random (non-identity) transform."""
    torch_net = stn_ref.TutorialNet()
    sd = _saved_and_loaded(torch_net, tmp_path)
    net = registry.create("stn_tutorial_net")
    x = random_nhwc((2, 28, 28, 1), seed=4)
    with torch.no_grad():
        expected = torch_net(nhwc_to_torch(x)).numpy()
    assert_close(jax.jit(net.apply)(from_torch(net, sd), x), expected, rtol=1e-4)



@pytest.mark.parametrize("name, g, s, std, legacy, channels", [
    ("ram_6_8x8_1", 8, 1, 0.05, False, 1), ("ram_6_8x8_2", 8, 2, 0.17, True, 1),
    ("ram_6_8x8_1", 8, 1, 0.05, False, 3)])
def test_ram_loads_kevinzakkas_recurrent_attention(name, g, s, std, legacy, channels,
                                                   tmp_path):
    """kevinzakka/recurrent-visual-attention's `RecurrentAttention` (28 x 28 x 1, one g x g
    patch, h_g = h_l = 128, 256 hidden): `ram_6_8x8_1` its current code with config.py's
    defaults, `ram_6_8x8_2` its code of 2018 that saved the shipped checkpoint. With a near-zero
    policy std each next location is the policy's noiseless one: the reference, driven through
    our locations, gives our baselines, our class scores (as log-softmax) and our next
    locations. With 3 channels, `sensor.fc1` reads the patches in the reference's (C, g, g)
    order."""
    torch_net = ram_ref.RecurrentAttention(g, 1, s, channels, 128, 128, 1e-6, 256, 10, legacy)
    sd = _saved_and_loaded(torch_net, tmp_path, scale=0.05)
    net = registry.create(name, std=1e-6)
    assert registry.create(name).std == std
    x = random_nhwc((3, 28, 28, channels), seed=5)
    out = jax.jit(net.apply)(from_torch(net, sd), x, rngs={"sample": jax.random.key(0)})
    locations = torch.from_numpy(np.array(out.locations))
    assert (np.abs(np.asarray(out.locations)) < 0.95).mean() > 0.5  # not saturated
    h, baselines = torch.zeros(3, 256), []
    with torch.no_grad():
        for t in range(6):
            h, _, b, *rest = torch_net(nhwc_to_torch(x), locations[:, t], h, last=t == 5)
            baselines.append(b.numpy())
            if t < 5:
                np.testing.assert_allclose(locations[:, t + 1].numpy(),
                                           torch_net.locator.location(h).numpy(), atol=1e-4)
    assert_close(out.baselines, np.stack(baselines, 1), rtol=1e-4)
    assert_close(jax.nn.log_softmax(out.logits), rest[0].numpy(), rtol=1e-4)


def _check_port(name: str, stage_sizes, cifar: bool, side: int, tmp_path) -> None:
    torch_net = port_ref.ResidualAttentionModel(stage_sizes, cifar)
    sd = _saved_and_loaded(torch_net, tmp_path, scale=0.1)
    net = registry.create(name, stage_sizes=stage_sizes)
    x = random_nhwc((1, side, side, 3), seed=6)
    with torch.no_grad():
        expected = torch_net(nhwc_to_torch(x)).numpy()
    assert_close(jax.jit(net.apply)(from_torch(net, sd), x), expected, rtol=1e-4)


def test_residual_attention_port_loads_tengshaofengs_cifar_network(tmp_path):
    """tengshaofeng's `ResidualAttentionModel_92_32input_update` (CIFAR-10) with one attention
    module a stage, on 16 x 16 input (its layout and keys; the full depth on its 32 x 32 input
    is a slow test)."""
    _check_port("residual_attention_92_32input_update", (1, 1, 1), True, 16, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, stage_sizes, cifar, side", [
    ("residual_attention_92_32input_update", (1, 2, 3), True, 32),
    ("residual_attention_56_port", (1, 1, 1), False, 224),
    ("residual_attention_92_port", (1, 2, 3), False, 224),
])
def test_residual_attention_port_loads_whole(name, stage_sizes, cifar, side, tmp_path):
    """The port's `ResidualAttentionModel_92_32input_update`, `_56` and `_92` at their input
    sizes."""
    _check_port(name, stage_sizes, cifar, side, tmp_path)
