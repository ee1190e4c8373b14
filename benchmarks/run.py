"""`python -m benchmarks.run [--only NAME] [--list] [--json PATH] [--processes N]`: every
mechanism against its PyTorch reference.

Prints a progress line per case (stderr) and, per case and mode, the median time of the jitted
JAX step and of the PyTorch reference, the speedup (torch ms / jax ms: above 1 means JAX is
faster), the goal (the speedup the issue asked for), and each side's peak memory growth over
one call; the full results go to `benchmarks/results/<machine>.json` (merged: the cases run
replace their old records). Each side of each case runs in its own process (in N of them,
alternating, with `--processes N`: the median of their medians). The cases are those
of the benchmark modules that the mechanism table (`flax_attention.mechanisms`) names; `--only`
takes a name `flax-attention list` prints (a mechanism's name or short name: its modules'
cases) or else part of a case's name; `--list` prints the cases chosen and exits.
"""

from __future__ import annotations

import importlib

from benchmarks import harness
from benchmarks.harness import Case
from flax_attention import mechanisms


def benchmark_modules() -> list[str]:
    """The benchmark modules of every mechanism, in table order, each once, then the scaling
    table's quick sizes (`benchmarks.scaling`) and the matrix products under the attentions
    (`benchmarks.matmul_floor`)."""
    names = [name for m in mechanisms.MECHANISMS for name in m.benchmarks]
    return list(dict.fromkeys([*names, "benchmarks.scaling", "benchmarks.matmul_floor"]))


def all_cases() -> list[Case]:
    return [case for name in benchmark_modules()
            for case in importlib.import_module(name).CASES]


def _of_mechanism(case: Case, name: str) -> bool:
    """Whether `case` is one of the cases of the benchmark modules of mechanism `name`."""
    row = next((m for m in mechanisms.MECHANISMS if name in (m.name, m.short)), None)
    return row is not None and any(case in importlib.import_module(module).CASES
                                   for module in row.benchmarks)


def main(argv=None) -> None:
    harness.main(all_cases(), "benchmarks.run", __doc__, argv=argv, matches=_of_mechanism)


if __name__ == "__main__":
    main()
