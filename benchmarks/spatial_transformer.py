"""Benchmarks of spatial_transformer against its PyTorch reference.

Bilinear sampling of N=64, C=32, 64x64 images on a random affine 64x64 grid, forward and
forward+backward (gradients for the image and the grid), against `torch.nn.functional.
grid_sample`. The "autodiff" case differentiates the same forward without the custom VJP (the
"before" of the custom backward); it has no goal.
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

BATCH, CHANNELS, SIZE = 64, 32, 64


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    """An NHWC image and random affine matrices near the identity (some samples fall outside)."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((BATCH, SIZE, SIZE, CHANNELS)).astype(np.float32)
    theta = np.eye(2, 3, dtype=np.float32) + 0.3 * rng.standard_normal((BATCH, 2, 3))
    return image, theta.astype(np.float32)


def _jax_setup(custom_vjp: bool):
    def setup():
        import jax.numpy as jnp

        from flax_attention.functional import spatial

        image, theta = _inputs()
        grid = spatial.affine_grid(jnp.asarray(theta), (SIZE, SIZE))
        if custom_vjp:
            return jax_steps(spatial.bilinear_sample, jnp.asarray(image), grid)
        return jax_steps(lambda a, g: spatial._sample(a, g, "zeros", False),  # noqa: SLF001
                         jnp.asarray(image), grid)

    return setup


def _torch_setup():
    import torch
    import torch.nn.functional as F

    image, theta = _inputs()
    grid = F.affine_grid(torch.from_numpy(theta), (BATCH, CHANNELS, SIZE, SIZE),
                         align_corners=False)
    image = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    return torch_steps(lambda a, g: F.grid_sample(a, g, align_corners=False), image, grid)


_NAME = f"spatial: bilinear_sample {BATCH}x{CHANNELS}x{SIZE}x{SIZE}"

CASES = [
    Case(_NAME, jax=_jax_setup(custom_vjp=True), torch=_torch_setup, goal=1.0),
    Case(f"{_NAME} autodiff", jax=_jax_setup(custom_vjp=False), torch=_torch_setup),
]
