"""Benchmarks of memory-efficient softmax attention (`functional.blockwise_attention`).

CPU (`CASES`, also `python -m benchmarks.blockwise [--only NAME]`): DANet's PAM widths, B = 1,
qk 64 and value 512 channels, at 64x64 and 128x128 positions: the JAX blockwise XLA path (blocks
of `DEFAULT_CHUNK_SIZE` queries) against the dense PyTorch reference, which holds the whole
`[L, L]` map (1 GiB at 128x128). Time and peak memory of each side, each in its own process.

GPU (`python -m benchmarks.blockwise --gpu`): at 128x128, C = 512 (qk 64), B = 1, float32 and
bfloat16: the dense XLA map, the blockwise XLA path, the Pallas flash kernel and the default
(`implementation=None`: XLA until a benchmark like this one proves a kernel faster on the GPU and
`kernels._common.PROVEN_BEST` records it; cuDNN takes equal widths only); median time,
compiled temporary memory, achieved TFLOP/s and HBM bandwidth as % of the device's peak.
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks import harness
from benchmarks.harness import (
    Case,
    jax_steps,
    peak_bandwidth,
    torch_steps,
    warm_median_ms,
)

QK, VALUE = 64, 512
CPU_SIZES = (64, 128)
GPU_SIZE = 128
GOAL = 1.5  # issue 18's goal for PAM, forward and forward+backward


def _arrays(side: int, batch: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    length = side * side
    return [rng.standard_normal((batch, length, c), dtype=np.float32) * 0.1
            for c in (QK, QK, VALUE)]


def _jax_blockwise(side: int):
    from flax_attention.functional.blockwise import blockwise_attention

    return jax_steps(functools.partial(blockwise_attention, implementation="xla"), *_arrays(side))


def _torch_dense(side: int):
    import torch

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v

    return torch_steps(attention, *(torch.from_numpy(a) for a in _arrays(side)))


CASES = [
    Case(f"blockwise PAM {s}x{s}", functools.partial(_jax_blockwise, s),
         functools.partial(_torch_dense, s), goal=GOAL)
    for s in CPU_SIZES
]


# --- GPU -----------------------------------------------------------------------------------------


def _gpu_variants() -> dict[str, dict]:
    length = GPU_SIZE * GPU_SIZE
    return {
        "dense xla": {"chunk_size": length, "implementation": "xla"},
        "blockwise xla": {"implementation": "xla"},
        "pallas flash": {"implementation": "pallas"},
        "default (None)": {},
    }


def _gpu_row(name: str, kwargs: dict, dtype, peak_bw: float) -> str:
    import jax
    import jax.numpy as jnp

    from flax_attention.functional.blockwise import blockwise_attention

    args = [jnp.asarray(a, dtype) for a in _arrays(GPU_SIZE)]
    fn = functools.partial(blockwise_attention, **kwargs)
    loss = jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    length, itemsize = args[0].shape[1], args[0].dtype.itemsize
    io_bytes = sum(a.size for a in args) * itemsize + length * VALUE * itemsize
    flops = 2 * length * length * (QK + VALUE)
    cells = []
    for mode, f, work, traffic in (("fwd", fn, flops, io_bytes),
                                   ("fwd+bwd", loss, 3.5 * flops, 3 * io_bytes)):
        compiled = jax.jit(f).lower(*args).compile()
        temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        ms = warm_median_ms(lambda c=compiled: jax.block_until_ready(c(*args)))
        cells.append(f"{mode} {ms:8.2f} ms {temp_mib:8.1f} MiB {work / ms / 1e9:6.1f} TFLOP/s "
                     f"{100 * traffic / (ms / 1e3) / peak_bw:5.1f}% HBM")
    return f"{name:<16} {jnp.dtype(dtype).name:<9} " + " | ".join(cells)


def gpu_main(peak_gbs: float | None = None) -> None:
    """Prints memory-efficient vs dense attention on the GPU at 128x128, C = 512 (qk 64)."""
    import jax.numpy as jnp

    kind, peak = peak_bandwidth(peak_gbs)
    print(f"# {kind}, peak HBM {peak / 1e12:.2f} TB/s; B=1, {GPU_SIZE}x{GPU_SIZE} "
          f"positions, qk {QK}, value {VALUE}; temp = compiled temporaries")
    for dtype in (jnp.float32, jnp.bfloat16):
        for name, kwargs in _gpu_variants().items():
            try:
                print(_gpu_row(name, kwargs, dtype, peak), flush=True)
            except Exception as err:  # one failing variant must not stop the table
                print(f"{name:<16} {jnp.dtype(dtype).name:<9} error: {err!s:.200}", flush=True)


def main(argv=None) -> None:
    harness.main(CASES, "benchmarks.blockwise", __doc__, gpu_main, argv)


if __name__ == "__main__":
    main()
