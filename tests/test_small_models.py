"""The small dense models (`models/small.py`) equal their PyTorch twins (`tests/reference/small.py`,
which `benchmarks/dense_training.py` times against them): the twin's random weights, converted by
`from_torch`, give the same outputs (eval mode; the FCN also in train mode, with batch
statistics), and both sides have the same number of parameters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from flax_attention.interop.torch import from_torch
from flax_attention.models import registry
from tests.helpers import assert_close, nhwc_to_torch, random_nhwc, randomize_, torch_to_nhwc
from tests.reference import small as ref

# the fields the trainers create the models with (`train.segmentation.AUX_WEIGHTS`)
FIELDS = {"danet-small": {"aux": True}, "ccnet-small": {"aux": True}}
# logits and boxes of both DETR decoder layers; DANet's three outputs; CCNet's and its dsn's
OUTPUTS = {"detr-small": 4, "danet-small": 3, "ccnet-small": 2, "fcn-small": 1}


def _pair(name: str):
    """The torch twin with random weights (eval mode) and the Flax model with them loaded."""
    torch_net = randomize_(ref.TWINS[name](), scale=0.2)
    model = registry.create(name, **FIELDS.get(name, {}))
    return torch_net, model, from_torch(model, torch_net.state_dict())


def _as_list(outputs) -> list:
    """The outputs as a flat list of NHWC / `[B, Q, ...]` numpy arrays."""
    if isinstance(outputs, dict):
        return [np.asarray(leaf.detach().numpy() if torch.is_tensor(leaf) else leaf)
                for leaf in jax.tree.leaves(outputs, is_leaf=torch.is_tensor)]
    outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return [torch_to_nhwc(o) if torch.is_tensor(o) else np.asarray(o) for o in outputs]


@pytest.mark.parametrize("name", ref.TWINS)
def test_small_model_equals_its_torch_twin(name):
    """Eval mode (DETR's aux outputs included), and the same parameter count."""
    torch_net, model, variables = _pair(name)
    x = random_nhwc((2, 64, 64, 1), seed=1)
    with torch.no_grad():
        expected = _as_list(torch_net(nhwc_to_torch(x)))
    actual = _as_list(jax.jit(model.apply)(variables, x))
    assert len(actual) == len(expected) == OUTPUTS[name]
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, rtol=2e-5)
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert count == sum(p.numel() for p in torch_net.parameters())


def test_small_segmenter_train_mode_equals_its_torch_twin():
    """Batch statistics on both sides (dropout off), on the FCN: the backbone and a head
    BatchNorm that the three segmenters share (their heads' own train mode is tested with the
    heads)."""
    torch_net, model, variables = _pair("fcn-small")
    torch_net.train()
    for m in torch_net.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.eval()
    x = random_nhwc((2, 64, 64, 1), seed=2)
    with torch.no_grad():
        expected = torch_to_nhwc(torch_net(nhwc_to_torch(x)))
    actual, _ = jax.jit(model.apply, static_argnames=("train", "mutable"))(
        variables, x, train=True, mutable=("batch_stats",))
    assert_close(actual, expected, rtol=2e-5)
