"""Benchmarks of memory-efficient softmax attention (`functional.blockwise_attention`).

CPU (`CASES`, also `python -m benchmarks.blockwise [--only NAME]`): DANet's PAM widths, B = 1,
qk 64 and value 512 channels, at 64x64 and 128x128 positions: the JAX blockwise XLA path (blocks
of `DEFAULT_CHUNK_SIZE` queries) against the dense PyTorch reference, which holds the whole
`[L, L]` map (1 GiB at 128x128). Time and peak memory of each side, each in its own process.

GPU (`python -m benchmarks.blockwise --gpu`): at 128x128, C = 512 (qk 64), B = 1, float32 and
bfloat16: the dense XLA map, the blockwise XLA path, the Pallas flash kernel and the default
(`implementation=None`: cuDNN when the widths are equal, else the Pallas kernel); median time,
compiled temporary memory, achieved TFLOP/s and HBM bandwidth as % of the device's peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import numpy as np

from benchmarks.harness import (
    HEADER,
    MODES,
    Case,
    format_row,
    jax_steps,
    measure,
    run_worker,
    torch_steps,
)

QK, VALUE = 64, 512
CPU_SIZES = (64, 128)
GPU_SIZE = 128
# HBM bandwidth in bytes/s by device kind (SXM parts; the first substring that matches).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


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
         functools.partial(_torch_dense, s))
    for s in CPU_SIZES
]


# --- GPU -----------------------------------------------------------------------------------------


def _median_ms(thunk, reps: int = 20) -> float:
    thunk()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        thunk()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
        ms = _median_ms(lambda c=compiled: jax.block_until_ready(c(*args)))
        cells.append(f"{mode} {ms:8.2f} ms {temp_mib:8.1f} MiB {work / ms / 1e9:6.1f} TFLOP/s "
                     f"{100 * traffic / (ms / 1e3) / peak_bw:5.1f}% HBM")
    return f"{name:<16} {jnp.dtype(dtype).name:<9} " + " | ".join(cells)


def gpu_main() -> None:
    """Prints memory-efficient vs dense attention on the GPU at 128x128, C = 512 (qk 64)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    peak = next((bw for kind, bw in PEAK_BANDWIDTH.items() if kind in device.device_kind), 3e12)
    print(f"# {device.device_kind}, peak HBM {peak / 1e12:.2f} TB/s; B=1, {GPU_SIZE}x{GPU_SIZE} "
          f"positions, qk {QK}, value {VALUE}; temp = compiled temporaries")
    for dtype in (jnp.float32, jnp.bfloat16):
        for name, kwargs in _gpu_variants().items():
            try:
                print(_gpu_row(name, kwargs, dtype, peak), flush=True)
            except Exception as err:  # one failing variant must not stop the table
                print(f"{name:<16} {jnp.dtype(dtype).name:<9} error: {err!s:.200}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="the GPU comparison instead")
    parser.add_argument("--only", default="", help="run the CPU cases whose name contains this")
    parser.add_argument("--worker", nargs=2, metavar=("INDEX", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu:
        gpu_main()
        return
    if args.worker:
        print(json.dumps(run_worker(CASES[int(args.worker[0])], args.worker[1])))
        return
    print(HEADER)
    for i, case in enumerate(CASES):
        if args.only in case.name:
            results = [measure(i, side, "benchmarks.blockwise") for side in ("jax", "torch")]
            for mode in MODES:
                print(format_row(case, mode, *results), flush=True)


if __name__ == "__main__":
    main()
