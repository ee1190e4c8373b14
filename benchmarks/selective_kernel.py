"""Benchmarks of Selective Kernel against its PyTorch reference (timm's form).

`SelectiveKernel()` (paths 3x3 and 3x3 dilated 2 on half the channels each, attention width 8) on
x `[8, 56, 56, 64]` (the first stage of skresnet18 at batch 8), BatchNorm in inference mode,
forward and forward+backward (gradients w.r.t. x and every parameter).
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

_SHAPE = (8, 56, 56, 64)


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_SHAPE).astype(np.float32)


def _jax_sk():
    import jax
    import jax.numpy as jnp

    from flax_attention.selective_kernel import SelectiveKernel

    module = SelectiveKernel()
    x = jnp.asarray(_x())
    variables = module.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    return jax_steps(lambda p, x: module.apply({"params": p, "batch_stats": stats}, x),
                     variables["params"], x)


def _torch_sk():
    import torch

    from tests.reference.selective_kernel import SelectiveKernel

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(SelectiveKernel(_SHAPE[-1]).eval(), x)


CASES = [Case("selective_kernel 8x56x56x64", _jax_sk, _torch_sk, goal=1.0)]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.selective_kernel", __doc__)
