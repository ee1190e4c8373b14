"""Benchmarks of CBAM and light CBAM against their PyTorch references (timm's `CbamModule`,
`LightCbamModule`).

Both with timm's defaults (hidden width C / 16, 7x7 spatial conv) on x `[32, 56, 56, 256]`,
BatchNorm in inference mode, forward and forward+backward (gradients w.r.t. x and every
parameter).
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

_SHAPE = (32, 56, 56, 256)


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_SHAPE).astype(np.float32)


def _jax_cbam(name: str):
    import jax
    import jax.numpy as jnp

    from flax_attention import cbam

    module = getattr(cbam, name)()
    x = jnp.asarray(_x())
    variables = module.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    return jax_steps(lambda p, x: module.apply({"params": p, "batch_stats": stats}, x),
                     variables["params"], x)


def _torch_cbam(name: str):
    import torch

    from tests.reference import cbam

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(getattr(cbam, name)(_SHAPE[-1]).eval(), x)


CASES = [
    Case(f"{short} 32x56x56x256", functools.partial(_jax_cbam, name),
         functools.partial(_torch_cbam, name), goal=1.0)
    for short, name in (("cbam", "CbamModule"), ("lcbam", "LightCbamModule"))
]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.cbam", __doc__)
