"""Criss-cross attention kernels: B=2, value channels 512, query/key channels 64, at 97x97
(CCNet's 769/8 map) and 128x128, forward and forward+backward.

`python -m benchmarks.kernels_criss_cross` (CPU, `CASES`): the XLA path against the PyTorch
reference, each side in its own process (the Pallas interpreter is no speed path).
`python -m benchmarks.kernels_criss_cross --gpu`: on a GPU, the Pallas kernels against the XLA
path (and PyTorch's reference on the same GPU when torch with CUDA is installed), with the
achieved bandwidth as % of the device's peak: the bytes every input must be read and every
output written once, over the time.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness
from benchmarks.harness import (
    MODES,
    Case,
    jax_steps,
    peak_bandwidth,
    torch_steps,
    warm_median_ms,
)

_B, _C, _CQK = 2, 512, 64
SIZES = (97, 128)
# HBM peak bytes/s by `device_kind` substring (first match wins); --peak-gbs overrides.


def _qkv(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [(_B, size, size, _CQK)] * 2 + [(_B, size, size, _C)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _jax_op(size: int, implementation: str):
    def setup():
        import functools

        import jax.numpy as jnp

        from flax_attention.functional.criss_cross import criss_cross_attention

        fn = functools.partial(criss_cross_attention, implementation=implementation)
        return jax_steps(fn, *map(jnp.asarray, _qkv(size)))

    return setup


def _torch_op(size: int, device: str = "cpu"):
    def setup():
        import torch

        from tests.reference.criss_cross import criss_cross_attention

        torch.set_default_device(device)  # the reference builds its mask on the default device
        tensors = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))).to(device)
                   for a in _qkv(size)]
        steps = torch_steps(criss_cross_attention, *tensors)
        if device == "cpu":
            return steps
        return {mode: _synchronised(step) for mode, step in steps.items()}

    return setup


def _synchronised(step):
    def run():
        import torch

        step()
        torch.cuda.synchronize()

    return run


CASES = [
    Case(f"criss_cross xla B2 C512 {size}x{size}", _jax_op(size, "xla"), _torch_op(size))
    for size in SIZES
]


# --- GPU: Pallas against XLA -------------------------------------------------------------------


def _ideal_bytes(size: int, mode: str) -> int:
    """Each input read once, each output written once (float32)."""
    qk, v = _B * size * size * _CQK * 4, _B * size * size * _C * 4
    forward = 2 * qk + 2 * v  # q, k, v in; out
    if mode == "fwd":
        return forward
    return forward + (2 * qk + 3 * v) + (2 * qk + v)  # q, k, v, out, d_out in; d_q, d_k, d_v


def gpu_main(peak_gbs: float | None = None) -> None:
    """Prints ms and % of peak bandwidth per size and mode: Pallas, XLA, (torch)."""
    import jax

    if jax.default_backend() != "gpu":
        raise SystemExit("--gpu needs JAX with a GPU (JAX_PLATFORMS=cuda)")
    kind, peak = peak_bandwidth(peak_gbs)
    print(f"# {kind}, peak {peak / 1e9:.0f} GB/s; B={_B} C={_C} C_qk={_CQK} float32")
    print(f"{'size':>7} {'mode':<8} {'side':<7} {'ms':>9} {'% peak':>7} {'vs xla':>7}")
    for size in SIZES:
        sides = {"pallas": _jax_op(size, "pallas")(), "xla": _jax_op(size, "xla")()}
        try:
            sides["torch"] = _torch_op(size, "cuda")()
        except (ImportError, RuntimeError, AssertionError) as err:  # no torch, or no CUDA
            print(f"# torch skipped: {err}")
        for mode in MODES:
            times = {side: warm_median_ms(steps[mode]) for side, steps in sides.items()}
            for side, ms in times.items():
                pct = 100 * _ideal_bytes(size, mode) / (ms * 1e-3) / peak
                print(f"{size:>4}^2 {mode:<8} {side:<7} {ms:>9.3f} {pct:>6.1f}% "
                      f"{times['xla'] / ms:>6.2f}x", flush=True)


def main(argv=None) -> None:
    harness.main(CASES, "benchmarks.kernels_criss_cross", __doc__, gpu_main, argv)


if __name__ == "__main__":
    main()
