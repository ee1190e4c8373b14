"""Benchmarks of multi-scale deformable attention (`functional.ms_deform_attn`, the XLA path)
against Deformable DETR's pure-torch `ms_deform_attn_core_pytorch` (grid_sample per level).

At Deformable DETR's encoder size: B = 2, the four levels of a 512 x 512 image at strides 8,
16, 32, 64 (64x64, 32x32, 16x16, 8x8: S = 5440), 8 heads of 32 channels, 4 points, one query
per pixel (Q = S); forward and forward+backward (gradients w.r.t. the values, the sampling
locations and the attention weights). Locations are uniform in [-0.05, 1.05] (some fall
outside), weights a softmax over the 16 points of each head. On CPU the Pallas kernel only runs
interpreted (a test path), so only XLA is timed here.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, jax_steps, torch_steps

SPATIAL_SHAPES = ((64, 64), (32, 32), (16, 16), (8, 8))
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """value `[B, S, N, D]`, locations `[B, Q, N, L, P, 2]`, weights `[B, Q, N, L, P]`."""
    rng = np.random.default_rng(0)
    keys, levels = sum(h * w for h, w in SPATIAL_SHAPES), len(SPATIAL_SHAPES)
    value = rng.standard_normal((BATCH, keys, HEADS, CHANNELS)).astype(np.float32)
    locations = rng.uniform(-0.05, 1.05, (BATCH, keys, HEADS, levels, POINTS, 2))
    logits = rng.standard_normal((BATCH, keys, HEADS, levels * POINTS))
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return (value, locations.astype(np.float32),
            weights.reshape(BATCH, keys, HEADS, levels, POINTS).astype(np.float32))


def _jax():
    import jax.numpy as jnp

    from flax_attention.functional import ms_deform_attn

    def attend(value, locations, weights):
        return ms_deform_attn(value, SPATIAL_SHAPES, locations, weights, implementation="xla")

    return jax_steps(attend, *(jnp.asarray(a) for a in _inputs()))


def _torch():
    import torch

    from tests.reference.deformable_attention import ms_deform_attn_core_pytorch

    def attend(value, locations, weights):
        return ms_deform_attn_core_pytorch(value, SPATIAL_SHAPES, locations, weights)

    return torch_steps(attend, *(torch.from_numpy(a) for a in _inputs()))


CASES = [Case("ms_deform_attn encoder 2x5440 N8 P4", _jax, _torch, goal=1.5)]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.deformable_attention", __doc__)
