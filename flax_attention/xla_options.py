"""XLA compiler options measured best for this library's programs, for `jax.jit`.

On XLA:CPU (jaxlib 0.10), convolutions, dot products and reductions go to YNNPACK library
fusions by default. Its convolutions and products ran slower than XLA's own ones in this
library's benchmarks (`python -m benchmarks.run`, torch / JAX forward+backward on a 2-core
CPU, defaults -> these options): Selective Kernel 0.55x -> 1.03x, DETR multi-head attention
1.19x -> 1.51x, `ms_deform_attn` 0.98x -> 1.50x, SE 3.7x -> 4.4x, CBAM 2.4x -> 2.6x; the
quadratic attentions (PAM, non-local) stayed within the noise. `compiler_options()` keeps
YNNPACK for reductions only.

Use them per program, `jax.jit(f, compiler_options=compiler_options())` (the trainers' steps
do), or for a whole process with `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` followed
by `LIBRARY_FUSION_TYPE_REDUCE`. Elsewhere than on the CPU, or where the installed XLA does not
know the option, there are none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["CPU_OPTIONS", "compiler_options"]

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _accepted(backend: str) -> bool:
    """Whether this XLA compiles a program with `CPU_OPTIONS` (an unknown option fails)."""
    try:
        zeros = jax.device_put(jnp.zeros(2), jax.local_devices(backend=backend)[0])
        jax.jit(jnp.sum, compiler_options=CPU_OPTIONS).lower(zeros).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile without them
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The options for programs on `backend` (None: JAX's default backend): `CPU_OPTIONS` on
    the CPU where XLA accepts them, else none. A new dict each call."""
    backend = backend or jax.default_backend()
    return dict(CPU_OPTIONS) if backend == "cpu" and _accepted(backend) else {}
