"""Benchmarks of DANet's position (PAM) and channel (CAM) attention against the PyTorch reference.

DANet's sizes: B=1, C=512 channels into the attention (qk width 64), at 64x64 and 97x97
positions; both are above `DEFAULT_CHUNK_SIZE`, so JAX runs PAM in blocks of 512 queries.
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

CHANNELS, QK = 512, 64
SIZES = ((64, 64), (97, 97))
GOAL = 1.5


def _arrays(hw, *channels):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, *hw, c), dtype=np.float32) * 0.1 for c in channels]


def _torch(arrays):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))) for a in arrays]


def pam_jax(hw):
    from flax_attention.functional.danet import position_attention

    return jax_steps(position_attention, *_arrays(hw, QK, QK, CHANNELS))


def pam_torch(hw):
    from tests.reference.danet import pam

    return torch_steps(pam, *_torch(_arrays(hw, QK, QK, CHANNELS)))


def cam_jax(hw):
    from flax_attention.functional.danet import channel_attention

    return jax_steps(channel_attention, *_arrays(hw, CHANNELS))


def cam_torch(hw):
    from tests.reference.danet import cam

    return torch_steps(cam, *_torch(_arrays(hw, CHANNELS)))


def module_jax(hw):
    import jax

    from flax_attention.danet import PositionAttention

    module, (x,) = PositionAttention(), _arrays(hw, CHANNELS)
    params = module.init(jax.random.key(0), x)["params"]
    return jax_steps(lambda p, x: module.apply({"params": p}, x), params, x)


def module_torch(hw):
    from tests.reference.danet import PositionAttention

    return torch_steps(PositionAttention(CHANNELS), *_torch(_arrays(hw, CHANNELS)))


def _cases(name, jax_setup, torch_setup):
    return [
        Case(f"danet {name} {h}x{w}", functools.partial(jax_setup, (h, w)),
             functools.partial(torch_setup, (h, w)), goal=GOAL)
        for h, w in SIZES
    ]


CASES = [
    *_cases("PAM op", pam_jax, pam_torch),
    *_cases("PositionAttention", module_jax, module_torch),
    *_cases("CAM op", cam_jax, cam_torch),
]
