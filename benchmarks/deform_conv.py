"""Benchmarks of `deform_conv2d` against the pure-torch im2col reference
(`tests/reference/deform_conv.py`, torchvision's semantics).

A ResNet stage size: x `[8, 56, 56, 64]`, a 3x3 kernel with padding 1 to 64 channels, one
offset group, random offsets of about a pixel; DCNv1 (no mask) and DCNv2 (a mask), forward and
forward+backward (gradients w.r.t. x, offset, mask, weight and bias).
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

_B, _H, _W, _C, _O, _K = 8, 56, 56, 64, 64, 3


def _inputs(modulated: bool) -> list[np.ndarray]:
    """NHWC x, offset, weight `[K, K, C, O]`, bias (and mask)."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((_B, _H, _W, _C)),
              rng.standard_normal((_B, _H, _W, 2 * _K * _K)),
              rng.standard_normal((_K, _K, _C, _O)) / (_K * np.sqrt(_C)),
              rng.standard_normal(_O)]
    if modulated:
        arrays.append(rng.uniform(size=(_B, _H, _W, _K * _K)))
    return [a.astype(np.float32) for a in arrays]


def _jax(modulated: bool):
    import jax.numpy as jnp

    from flax_attention.functional.deform_conv import deform_conv2d

    def fn(x, offset, weight, bias, mask=None):
        return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    return jax_steps(fn, *map(jnp.asarray, _inputs(modulated)))


def _torch(modulated: bool):
    import torch

    from tests.reference.deform_conv import deform_conv2d

    x, offset, weight, bias, *mask = _inputs(modulated)

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))

    args = [nchw(x), nchw(offset), torch.from_numpy(weight.transpose(3, 2, 0, 1).copy()),
            torch.from_numpy(bias), *map(nchw, mask)]

    def fn(x, offset, weight, bias, mask=None):
        return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    return torch_steps(fn, *args)


CASES = [
    Case(f"deform_conv2d {name} {_B}x{_H}x{_W}x{_C}", functools.partial(_jax, modulated),
         functools.partial(_torch, modulated), goal=1.0)
    for name, modulated in (("v1", False), ("v2", True))
]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.deform_conv", __doc__)
