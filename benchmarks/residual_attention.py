"""Benchmarks of the Residual Attention Network against the PyTorch reference network.

Attention-56 (ImageNet, 1000 classes) inference, batch 16 at 224x224, BatchNorm in eval mode;
images/s = 16000 / ms. Only the forward pass is timed (the goal is forward throughput).
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

BATCH, SIZE = 16, 224


def _images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 3), dtype=np.float32)


def attention56_jax():
    import jax

    from flax_attention.models.residual_attention import residual_attention_56

    model, x = residual_attention_56(), _images()
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    forward = jax_steps(lambda v, images: model.apply(v, images), variables, x)["fwd"]
    return {"fwd": forward}


def attention56_torch():
    import torch

    from tests.reference.residual_attention import ResidualAttentionNetwork

    model = ResidualAttentionNetwork((1, 1, 1)).eval()
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_images(), -1, 1)))
    return {"fwd": torch_steps(model, x)["fwd"]}


CASES = [
    Case(f"attention-56 fwd b{BATCH} {SIZE}x{SIZE}", attention56_jax, attention56_torch, goal=1.0),
]
