"""Choosing between a Pallas kernel and the XLA path: the `implementation` argument.

    implementation=None      Pallas on a GPU when the kernel supports the shapes and dtypes,
                             XLA otherwise (never an error).
    implementation="xla"     XLA everywhere.
    implementation="pallas"  the Pallas kernel; compiled on a GPU, run by the Pallas interpreter
                             elsewhere (slow: for tests). Shapes or dtypes the kernel does not
                             support raise ValueError saying why.
"""

from __future__ import annotations

import jax

from flax_attention._checks import check_choice

__all__ = ["IMPLEMENTATIONS", "interpret", "on_gpu", "use_pallas"]

IMPLEMENTATIONS = (None, "xla", "pallas")


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU (where the kernels compile)."""
    return jax.default_backend() == "gpu"


def interpret() -> bool:
    """The `interpret` flag of `pl.pallas_call`: True off the GPU."""
    return not on_gpu()


def use_pallas(implementation: str | None, unsupported: str | None = None) -> bool:
    """Whether to run the Pallas kernel.

    Args:
      implementation: None, "xla" or "pallas" (see the module docstring).
      unsupported: why the kernel cannot take these inputs, or None when it can.

    Raises:
      ValueError: an unknown `implementation`, or "pallas" asked for inputs it cannot take.
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation == "pallas" and unsupported is not None:
        raise ValueError(f"implementation='pallas' cannot run here: {unsupported}; "
                         "use implementation='xla' or None")
    if implementation is None:
        return on_gpu() and unsupported is None
    return implementation == "pallas"
