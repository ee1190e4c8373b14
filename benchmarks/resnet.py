"""Benchmarks of the SE-ResNet network against its PyTorch reference.

SE-ResNet-50 (1000 classes) inference on a `[16, 224, 224, 3]` batch, forward only (the
throughput in images/s is 16000 / ms); both sides start from the same weights (torch's
initialisation, imported with `from_torch`), BatchNorm in eval mode.
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

_SHAPE = (16, 224, 224, 3)


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_SHAPE).astype(np.float32)


def _torch_net():
    import torch

    from tests.reference.resnet import se_resnet50

    torch.manual_seed(0)
    return se_resnet50().eval()


def _jax_se_resnet50():
    import flax_attention.models.resnet  # noqa: F401  (registers the converter)
    from flax_attention.interop.torch import from_torch
    from flax_attention.models import se_resnet50
    from tests.helpers import state_dict

    net = se_resnet50()
    variables = from_torch(net, state_dict(_torch_net()))
    steps = jax_steps(lambda v, x: net.apply(v, x), variables, _x())
    return {"fwd": steps["fwd"]}


def _torch_se_resnet50():
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return {"fwd": torch_steps(_torch_net(), x)["fwd"]}


CASES = [Case("se_resnet50 16x224x224x3", _jax_se_resnet50, _torch_se_resnet50, goal=1.0)]
