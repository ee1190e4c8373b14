"""`python -m benchmarks.run [--only NAME]`: every mechanism against its PyTorch reference.

Prints, per case and mode, the median time of the jitted JAX step and of the PyTorch reference,
their ratio (torch / jax: above 1 means JAX is faster), the goal from the issue, and each side's
peak memory growth over one call. Each side of each case runs in its own process.
"""

from __future__ import annotations

import importlib

from benchmarks import harness
from benchmarks.harness import Case

FAMILIES = (
    "squeeze_excitation",
    "non_local",
    "danet",
    "criss_cross",
    "spatial_transformer",
    "transformer",
    "resnet",
    "residual_attention",
    "kernels_criss_cross",
    "kernels_bilinear",
    "blockwise",
)


def all_cases() -> list[Case]:
    cases = []
    for family in FAMILIES:
        cases.extend(importlib.import_module(f"benchmarks.{family}").CASES)
    return cases


def main(argv=None) -> None:
    harness.main(all_cases(), "benchmarks.run", __doc__, argv=argv)


if __name__ == "__main__":
    main()
