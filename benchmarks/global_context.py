"""Benchmarks of global context attention against its PyTorch reference (timm's
`GlobalContext`).

`GlobalContext()` (timm's `gc`: attention pooling, scale fusion, hidden width C / 8) and
`GlobalContext(fuse_add=True, fuse_scale=False)` (timm's `gca`, the paper's block) on x
`[32, 56, 56, 256]`, forward and forward+backward (gradients w.r.t. x and every parameter).
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

_SHAPE = (32, 56, 56, 256)
_GCA = {"fuse_add": True, "fuse_scale": False}


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_SHAPE).astype(np.float32)


def _jax_gc(**kwargs):
    import jax
    import jax.numpy as jnp

    from flax_attention.global_context import GlobalContext

    module = GlobalContext(**kwargs)
    x = jnp.asarray(_x())
    params = module.init(jax.random.key(0), x)["params"]
    return jax_steps(lambda p, x: module.apply({"params": p}, x), params, x)


def _torch_gc(**kwargs):
    import torch

    from tests.reference.global_context import GlobalContext

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(GlobalContext(_SHAPE[-1], **kwargs), x)


CASES = [
    Case("global_context 32x56x56x256", _jax_gc, _torch_gc, goal=1.0),
    Case("global_context gca 32x56x56x256", functools.partial(_jax_gc, **_GCA),
         functools.partial(_torch_gc, **_GCA), goal=1.0),
]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.global_context", __doc__)
