"""The floor under the attention benchmarks: one matrix product, XLA's against torch's.

PAM, non-local, CAM and the DETR transformer spend most of their time in a few large float32
matrix products, so their speedup over torch cannot exceed that of the products themselves.
Each case here times one `jnp.einsum` of an attention's shapes (jitted with
`compiler_options()`, as the mechanism cases are) against `torch.einsum`, each side in its own
process; forward+backward adds the two products of the gradients.

On the 2-core CPU of `benchmarks/results/` (one quiet run each, medians, ms, XLA / torch):
pinned to one core, the products are level or nearly so (CAM energy 49.8 / 52.1, CAM output
41.7 / 43.5, PAM output 169 / 174, feed-forward 16.3 / 15.5; the non-local shapes 22.9 / 18.8);
on both cores torch gains 1.5-2x from the second core and XLA's dot 1.1-1.6x, so there XLA's
products run 0.7-1.2x torch's speed. CAM energy's forward+backward (autodiff) shows one more
loss: XLA computes both gradients as `[C, L]` products and transposes each to `[L, C]` twice
(about 55 of 236 ms); `functional.danet.channel_attention` has a hand-written backward that
forms them as `[L, C]` directly.
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

# (name, einsum, first operand, second operand): the largest product of each mechanism case.
PRODUCTS = (
    ("CAM energy 97x97 C512", "blc,bld->bcd", (1, 97 * 97, 512), (1, 97 * 97, 512)),
    ("CAM output 97x97 C512", "bcd,bld->blc", (1, 512, 512), (1, 97 * 97, 512)),
    ("PAM output 64x64 C512", "bqk,bkd->bqd", (1, 4096, 4096), (1, 4096, 512)),
    ("non-local scores 64x64", "bqd,bkd->bqk", (1, 4096, 256), (1, 1024, 256)),
    ("DETR feed-forward 1700x256x2048", "bld,df->blf", (1, 1700, 256), (256, 2048)),
)


def _operands(a_shape, b_shape) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s, dtype=np.float32) / 4 for s in (a_shape, b_shape)]


def _jax(equation, a_shape, b_shape):
    import jax.numpy as jnp

    return jax_steps(lambda a, b: jnp.einsum(equation, a, b),
                     *map(jnp.asarray, _operands(a_shape, b_shape)))


def _torch(equation, a_shape, b_shape):
    import torch

    return torch_steps(lambda a, b: torch.einsum(equation, a, b),
                       *map(torch.from_numpy, _operands(a_shape, b_shape)))


def _case(name, equation, a_shape, b_shape) -> Case:
    return Case(f"matmul floor: {name}", lambda: _jax(equation, a_shape, b_shape),
                lambda: _torch(equation, a_shape, b_shape))


CASES = [_case(*product) for product in PRODUCTS]
