"""Benchmarks of criss-cross attention (CCNet) against its PyTorch reference.

B = 1, value channels 512, query/key channels 64, at 64x64 and at 97x97 (CCNet's 769/8 map).
"op" times the attention itself from given q, k, v: the fused `criss_cross_attention` (its
custom VJP) and, for comparison, the unfused `criss_cross_aggregate(criss_cross_weights(...))`
differentiated by XLA. "module" times the whole `CrissCrossAttention` (1x1 convs + op).
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

_C, _CQK = 512, 64


def _qkv(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [(1, size, size, _CQK)] * 2 + [(1, size, size, _C)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _nchw(arrays: list[np.ndarray]) -> list:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))) for a in arrays]


def _jax_op(size: int, fused: bool):
    def setup():
        import jax.numpy as jnp

        from flax_attention.functional import criss_cross as cc

        def unfused(q, k, v):
            return cc.criss_cross_aggregate(cc.criss_cross_weights(q, k), v)

        fn = cc.criss_cross_attention if fused else unfused
        return jax_steps(fn, *map(jnp.asarray, _qkv(size)))

    return setup


def _torch_op(size: int):
    def setup():
        from tests.reference.criss_cross import criss_cross_attention

        return torch_steps(criss_cross_attention, *_nchw(_qkv(size)))

    return setup


def _jax_module(size: int):
    def setup():
        import jax
        import jax.numpy as jnp

        from flax_attention.criss_cross import CrissCrossAttention

        module = CrissCrossAttention()
        x = jnp.asarray(_qkv(size)[2])
        params = module.init(jax.random.key(0), x)["params"]
        return jax_steps(lambda p, x: module.apply({"params": p}, x), params, x)

    return setup


def _torch_module(size: int):
    def setup():
        import torch

        from tests.reference.criss_cross import CrissCrossAttention

        module = CrissCrossAttention(_C)
        with torch.no_grad():
            module.gamma.fill_(0.5)
        return torch_steps(module, *_nchw(_qkv(size)[2:]))

    return setup


CASES = [
    Case("criss_cross op 64x64", _jax_op(64, True), _torch_op(64), goal=3.0),
    Case("criss_cross op 97x97", _jax_op(97, True), _torch_op(97), goal=1.5),
    Case("criss_cross unfused op 64x64", _jax_op(64, False), _torch_op(64)),
    Case("criss_cross unfused op 97x97", _jax_op(97, False), _torch_op(97)),
    Case("criss_cross module 97x97", _jax_module(97), _torch_module(97)),
]
