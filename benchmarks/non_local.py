"""Benchmarks of the non-local block against its PyTorch reference.

`NonLocal2D(mode="embedded", sub_sample=True)` with B = 1, C = 512, inter 256 at 64x64
(4096 queries, 1024 keys), in inference mode; forward+backward takes gradients w.r.t. x and
every parameter. "op" times `functional.non_local` alone from given theta, phi, g.
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

_C, _INTER, _SIZE = 512, 256, 64


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, _SIZE, _SIZE, _C)).astype(np.float32)


def _jax_block():
    import jax
    import jax.numpy as jnp

    from flax_attention.non_local import NonLocal2D

    module = NonLocal2D(_INTER, mode="embedded")
    x = jnp.asarray(_x())
    variables = module.init(jax.random.key(0), x)
    stats = variables["batch_stats"]
    return jax_steps(lambda p, x: module.apply({"params": p, "batch_stats": stats}, x),
                     variables["params"], x)


def _torch_block():
    import torch

    from tests.reference.non_local import NonLocalBlock

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_x(), -1, 1)))
    return torch_steps(NonLocalBlock(_C, 2, "embedded", _INTER).eval(), x)


def _qkv() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    queries, keys = _SIZE * _SIZE, _SIZE * _SIZE // 4
    shapes = [(1, queries, _INTER), (1, keys, _INTER), (1, keys, _INTER)]
    return [rng.standard_normal(s).astype(np.float32) / 4 for s in shapes]


def _jax_op():
    import jax.numpy as jnp

    from flax_attention.functional.non_local import non_local

    return jax_steps(non_local, *map(jnp.asarray, _qkv()))


def _torch_op():
    import torch

    def op(theta, phi, g):
        return torch.softmax(theta @ phi.transpose(1, 2), dim=-1) @ g

    return torch_steps(op, *map(torch.from_numpy, _qkv()))


CASES = [
    Case("non_local 2D embedded 64x64", _jax_block, _torch_block, goal=1.5),
    Case("non_local op embedded 64x64", _jax_op, _torch_op),
]
