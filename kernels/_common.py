"""What every kernel file shares: the dtypes and tile limits of the Pallas (Triton) kernels, the
finite mask value, and the one `implementation` vocabulary of the ops with alternatives.

    implementation="xla"     the XLA path (the reference math), on every platform.
    implementation="pallas"  the Pallas kernel: compiled on a GPU, run by the Pallas interpreter
                             elsewhere (slow: for tests). Inputs it cannot take raise ValueError.
    implementation="cudnn"   cuDNN's fused attention (NVIDIA GPUs), where an op has it.
    implementation=None      what a benchmark recorded in the repo proved best on the platform
                             (`PROVEN_BEST`); XLA otherwise. None never picks a kernel that has
                             not been timed there.

Each op accepts the subset it has (`check_implementation`); anything else raises.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "MIN_BLOCK",
    "PROVEN_BEST",
    "SUPPORTED_DTYPES",
    "check_implementation",
    "dtype_unsupported",
    "on_gpu",
    "pick_implementation",
]

# The dtypes the kernels take (Triton's dots in float32 or half precision).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# A finite stand-in for -inf in float32 logits, so fully masked rows stay finite.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Triton's `tl.dot` needs every dimension of a tile to be at least 16.
MIN_BLOCK = 16

IMPLEMENTATIONS = ("xla", "pallas", "cudnn", None)
# (op, `jax.default_backend()`) -> the implementation a benchmark in the repo proved fastest
# there; None picks it. Empty: no kernel has been timed on a GPU yet, so None is XLA everywhere.
PROVEN_BEST: dict[tuple[str, str], str] = {}


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU, where the kernels compile (else: interpret)."""
    return jax.default_backend() == "gpu"


def check_implementation(op: str, implementation: str | None, choices: tuple) -> None:
    """Raises ValueError, naming `op` and its `choices`, unless `implementation` is one."""
    if implementation not in choices:
        raise ValueError(f"implementation must be one of {choices} for {op}, "
                         f"got {implementation!r}")


def pick_implementation(op: str, implementation: str | None, choices: tuple,
                        unsupported: Mapping[str, str | None] | None = None) -> str:
    """The implementation `op` runs: `implementation`, or for None the `PROVEN_BEST` one.

    Args:
      op: the public function's name, for messages.
      implementation: one of `choices`.
      choices: the subset of `IMPLEMENTATIONS` that `op` has.
      unsupported: for each alternative to "xla", why it cannot take these inputs (None if it
        can).

    Raises:
      ValueError: an `implementation` not in `choices`, or one asked for inputs it cannot take.
    """
    check_implementation(op, implementation, choices)
    reasons = unsupported or {}
    if implementation is None:
        best = PROVEN_BEST.get((op, jax.default_backend()), "xla")
        return best if reasons.get(best) is None else "xla"
    if reasons.get(implementation) is not None:
        raise ValueError(f"implementation={implementation!r} cannot run {op} here: "
                         f"{reasons[implementation]}; use implementation='xla' or None")
    return implementation


def dtype_unsupported(**arrays: jax.Array) -> str | None:
    """Why the kernels cannot take these arrays' dtypes, or None."""
    for name, x in arrays.items():
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            return f"{name} has dtype {x.dtype}; the kernels take float32, bfloat16 or float16"
    return None
