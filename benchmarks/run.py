"""`python -m benchmarks.run [--only NAME]`: every mechanism against its PyTorch reference.

Prints, per case and mode, the median time of the jitted JAX step and of the PyTorch reference,
their ratio (torch / jax: above 1 means JAX is faster), the goal from the issue, and each side's
peak memory growth over one call. Each side of each case runs in its own process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform

from benchmarks.harness import HEADER, MODES, Case, format_row, measure, run_worker

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--worker", nargs=2, metavar=("INDEX", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.worker:
        print(json.dumps(run_worker(cases[int(args.worker[0])], args.worker[1])))
        return
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(HEADER)
    for i, case in enumerate(cases):
        if args.only not in case.name:
            continue
        jax_r, torch_r = measure(i, "jax", "benchmarks.run"), measure(i, "torch", "benchmarks.run")
        for mode in MODES:
            print(format_row(case, mode, jax_r, torch_r), flush=True)


if __name__ == "__main__":
    main()
