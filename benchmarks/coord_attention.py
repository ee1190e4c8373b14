"""Benchmarks of coordinate attention against its PyTorch reference (timm's `CoordAttn`).

`CoordAttention()` (hidden width 16) on x `[32, 56, 56, 256]`, BatchNorm in inference mode,
forward and forward+backward (gradients w.r.t. x and every parameter).
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

_SHAPE = (32, 56, 56, 256)


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_SHAPE).astype(np.float32)


def _jax_ca():
    import jax
    import jax.numpy as jnp

    from flax_attention.coord_attention import CoordAttention

    module = CoordAttention()
    x = jnp.asarray(_x())
    variables = module.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    return jax_steps(lambda p, x: module.apply({"params": p, "batch_stats": stats}, x),
                     variables["params"], x)


def _torch_ca():
    import torch

    from tests.reference.coord_attention import CoordAttn

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(CoordAttn(_SHAPE[-1]).eval(), x)


CASES = [Case("coord_attention 32x56x56x256", _jax_ca, _torch_ca, goal=1.0)]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.coord_attention", __doc__)
