"""Benchmarks of squeeze-and-excitation against its PyTorch reference.

`SELayer(reduction=16)` on x `[32, 56, 56, 256]` (the first stage of SE-ResNet-50 at batch 32),
forward and forward+backward (gradients w.r.t. x and both fc weights).
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

_SHAPE = (32, 56, 56, 256)
_REDUCTION = 16


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_SHAPE).astype(np.float32)


def _jax_se():
    import jax
    import jax.numpy as jnp

    from flax_attention.squeeze_excitation import SELayer

    module = SELayer(_REDUCTION)
    x = jnp.asarray(_x())
    params = module.init(jax.random.key(0), x)["params"]
    return jax_steps(lambda p, x: module.apply({"params": p}, x), params, x)


def _torch_se():
    import torch

    from tests.reference.squeeze_excitation import SELayer

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(SELayer(_SHAPE[-1], _REDUCTION), x)


CASES = [Case("se_layer 32x56x56x256", _jax_se, _torch_se, goal=1.0)]
