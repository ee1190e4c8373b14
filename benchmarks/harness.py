"""Benchmark harness: each (case, side) is timed in its own process, so torch's OpenMP threads
never spin while JAX runs, and peak memory is that process's own.

A case gives, for each side, a setup function returning `{mode: thunk}` with modes "fwd" and
"fwd+bwd"; a thunk runs one step and blocks until its result is ready. The worker times the
median of repeated calls after a warm-up (which also compiles), and measures peak memory as the
growth of the process's resident set (VmHWM after a reset, minus VmRSS before) over one call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

Thunk = Callable[[], object]
Setup = Callable[[], dict[str, Thunk]]

MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    jax: Setup
    torch: Setup
    goal: float | None = None  # the speed-up over torch the issue asks for (fwd+bwd, or fwd)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_mib(thunk: Thunk) -> float:
    """Growth of resident memory over one call, in MiB (Linux; nan elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
        thunk()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return float("nan")


def median_ms(thunk: Thunk, min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0):
    times = []
    start = time.perf_counter()
    def more() -> bool:
        return len(times) < max_reps and time.perf_counter() - start < budget_s

    while len(times) < min_reps or more():
        t0 = time.perf_counter()
        thunk()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak_gflops(size: int = 2048, reps: int = 5) -> float:
    """This process's float32 matrix-product rate in GFLOP/s: the fastest of `reps` torch
    products of two `size` x `size` matrices, after one untimed product."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / min(times) / 1e9


def torch_gflop(thunk: Thunk) -> float | None:
    """The GFLOP of the matrix products and convolutions in one torch step, the backward pass
    included, by the formulas of torch's `FlopCounterMode` (whose module tracker fails on
    `torch.no_grad` steps through `nn.MultiheadAttention`); None if counting fails."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            formula = flop_registry.get(func._overloadpacket)
            if formula is None:
                with self:
                    decomposed = func.decompose(*args, **kwargs)
                if decomposed is not NotImplemented:
                    return decomposed
            out = func(*args, **kwargs)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
            return out

    counter = Count()
    try:
        with counter:
            thunk()
    except Exception:  # noqa: BLE001 - no count, no bound; the times stand
        return None
    return counter.flops / 1e9


def run_worker(case: Case, side: str) -> dict:
    """Times one side of one case in this process; on the torch side, also counts each step's
    product FLOPs and measures the process's product rate (for `bound`)."""
    thunks = getattr(case, side)()
    result = {}
    for mode, thunk in thunks.items():
        thunk()  # warm-up and compilation
        thunk()
        result[mode] = {"ms": median_ms(thunk), "peak_mib": _peak_mib(thunk)}
        if side == "torch":
            result[mode]["gflop"] = torch_gflop(thunk)
    if side == "torch":
        peak = matmul_peak_gflops()
        for r in result.values():
            r["peak_gflops"] = peak
    return result


def bound(torch_r: dict) -> float | None:
    """The largest speedup over torch of any program that does torch's product FLOPs at the
    product rate of torch's process: torch's time over the FLOPs' time at that rate (None
    without products). At or near 1, torch's step is bound by its products."""
    gflop, peak = torch_r.get("gflop"), torch_r.get("peak_gflops")
    if not gflop or not peak:
        return None
    return torch_r["ms"] / (1e3 * gflop / peak)


def measure(case_index: int, side: str, module: str) -> dict:
    """Runs `run_worker` for one case and side in a fresh interpreter; returns its result."""
    platforms = os.environ.get("JAX_PLATFORMS", "cpu")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS=platforms)
    cmd = [sys.executable, "-m", module, "--worker", str(case_index), side]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def combine(runs: list[dict]) -> dict:
    """One side's result over several processes: per mode, the median of the processes'
    medians (and of their other numbers), with every process's time in `ms_runs`; the first
    error if any process failed. A process's speed on a shared 2-core machine can differ by
    a quarter from the next one's, so one process's median is not the side's."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    modes = [m for m in MODES if all(m in r for r in runs)]
    return {m: {**{key: _median([r[m][key] for r in runs]) for key in runs[0][m]},
                "ms_runs": [r[m]["ms"] for r in runs]} for m in modes}


def _median(values: list[float | None]) -> float | None:
    """The median, or None if a process had no value (an uncounted FLOP total)."""
    return None if None in values else statistics.median(values)


def measure_sides(case_index: int, module: str, processes: int) -> tuple[dict, dict]:
    """Both sides of one case, each timed in `processes` fresh interpreters, alternating
    (JAX, torch, JAX, ...) so that a slow spell of the machine falls on both."""
    runs = {"jax": [], "torch": []}
    for _ in range(processes):
        for side, results in runs.items():
            results.append(measure(case_index, side, module))
    return combine(runs["jax"]), combine(runs["torch"])


def format_row(case: Case, mode: str, jax_r: dict, torch_r: dict) -> str:
    if "error" in jax_r or "error" in torch_r:
        return f"{case.name:<34} {mode:<8} error: {jax_r.get('error') or torch_r.get('error')}"
    j, t = jax_r.get(mode), torch_r.get(mode)
    if j is None or t is None:
        return f"{case.name:<34} {mode:<8} (not measured)"
    ratio = t["ms"] / j["ms"]
    goal = f"{case.goal:.1f}x" if case.goal else "-"
    most = bound(t)
    most = "-" if most is None else f"{most:.2f}x" if most < 100 else ">100x"
    return (
        f"{case.name:<34} {mode:<8} {j['ms']:>10.2f} {t['ms']:>10.2f} {ratio:>7.2f}x {goal:>6} "
        f"{most:>7} {j['peak_mib']:>9.1f} {t['peak_mib']:>9.1f}"
    )


# Set (to "1") in a worker's environment by `--xla-defaults`: JAX programs compiled with XLA's
# default options rather than `flax_attention.xla_options.compiler_options()`.
XLA_DEFAULTS_ENV = "FLAX_ATTENTION_BENCH_XLA_DEFAULTS"


def jax_compiler_options() -> dict[str, str]:
    """The compiler options of the JAX side's programs: the library's
    (`flax_attention.xla_options.compiler_options()`), or none under `--xla-defaults`."""
    from flax_attention.xla_options import compiler_options

    return {} if os.environ.get(XLA_DEFAULTS_ENV) == "1" else compiler_options()


def jax_steps(fn: Callable, *args) -> dict[str, Thunk]:
    """Forward and forward+backward (gradients w.r.t. every argument) of `fn(*args)`, jitted
    with `jax_compiler_options()`.

    The backward step returns the loss too (`value_and_grad`), so XLA cannot drop the part of the
    forward pass that only the loss needs, which torch always computes.
    """
    import jax
    import jax.numpy as jnp

    options = jax_compiler_options()
    fwd = jax.jit(fn, compiler_options=options)
    grad = jax.jit(
        jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))),
        compiler_options=options,
    )
    return {
        "fwd": lambda: jax.block_until_ready(fwd(*args)),
        "fwd+bwd": lambda: jax.block_until_ready(grad(*args)),
    }


def torch_steps(fn: Callable, *args) -> dict[str, Thunk]:
    """Forward (no autograd) and forward+backward of `fn(*args)`; `args` are leaf tensors."""
    import torch

    def fwd():
        with torch.no_grad():
            return fn(*args)

    def fwd_bwd():
        for a in args:
            a.grad = None
        fn(*args).sum().backward()

    for a in args:
        a.requires_grad_(True)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


HEADER = (
    f"{'case':<34} {'mode':<8} {'jax ms':>10} {'torch ms':>10} {'speedup':>8} {'goal':>6} "
    f"{'bound':>7} {'jax MiB':>9} {'torch MiB':>9}"
)


# Peak HBM bandwidth in bytes/s by device kind (the first name contained in the kind wins).
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))


def peak_bandwidth(override_gbs: float | None = None) -> tuple[str, float]:
    """The default device's kind and peak HBM bandwidth in bytes/s (`override_gbs` GB/s when
    given); exits with a message for an unknown device."""
    import jax

    kind = jax.devices()[0].device_kind
    if override_gbs:
        return kind, override_gbs * 1e9
    peak = next((bw for name, bw in PEAK_BANDWIDTH if name in kind), None)
    if peak is None:
        raise SystemExit(f"unknown peak bandwidth of {kind!r}: pass --peak-gbs")
    return kind, peak


def warm_median_ms(thunk: Thunk) -> float:
    """`median_ms` after two untimed calls (compilation and warm-up)."""
    thunk()
    thunk()
    return median_ms(thunk)


LEGEND = ("speedup: torch ms / jax ms of the same step (above 1: JAX is faster); goal: the "
          "speedup the issue asked for (- none); bound: the most speedup possible while doing "
          "torch's product FLOPs at the machine's product rate (torch ms over their time at "
          "the rate of a 2048^3 product in torch's process; - without products); MiB: peak "
          "memory growth over one call")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_name() -> str:
    """A file name for this machine's results: its CPU model and count, e.g. "amd-epyc-2cpu"
    (without touching an accelerator: the workers own it)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1] for line in f if line.startswith("model name")),
                         model)
    except OSError:
        pass
    slug = "-".join("".join(c if c.isalnum() else " " for c in model.lower()).split())
    return f"{slug}-{os.cpu_count()}cpu"


def result_records(case: Case, jax_r: dict, torch_r: dict) -> list[dict]:
    """The JSON records of one case: one per mode, with both sides' times, memory and the
    speedup, or the error."""
    error = jax_r.get("error") or torch_r.get("error")
    if error:
        return [{"case": case.name, "error": error}]
    records = []
    for mode in MODES:
        j, t = jax_r.get(mode), torch_r.get(mode)
        if j is not None and t is not None:
            records.append({"case": case.name, "mode": mode, "jax_ms": j["ms"],
                            "torch_ms": t["ms"], "speedup": t["ms"] / j["ms"], "goal": case.goal,
                            "jax_peak_mib": j["peak_mib"], "torch_peak_mib": t["peak_mib"],
                            "torch_gflop": t.get("gflop"), "peak_gflops": t.get("peak_gflops"),
                            "bound": bound(t),
                            "jax_ms_runs": j.get("ms_runs", [j["ms"]]),
                            "torch_ms_runs": t.get("ms_runs", [t["ms"]]),
                            "jax_compiler_options": _options_label()})
    return records


def _options_label() -> str:
    """Which compiler options the JAX programs had (`jax_compiler_options`)."""
    if os.environ.get(XLA_DEFAULTS_ENV) == "1":
        return "XLA defaults"
    return "flax_attention.xla_options.compiler_options()"


def write_results(path: str, records: list[dict]) -> None:
    """Merges `records` into the JSON file `path` (the cases run replace their old records)."""
    old = {"records": []}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    ran = {r["case"] for r in records}
    kept = [r for r in old.get("records", []) if r["case"] not in ran]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"machine": machine_name(), "python": platform.python_version(),
                   "jax_platforms": os.environ.get("JAX_PLATFORMS", "cpu"),
                   "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                   "date": time.strftime("%Y-%m-%d"), "records": kept + records}, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(cases: list[Case], module: str, description: str | None,
         gpu_main: Callable[[float | None], None] | None = None, argv=None,
         matches: Callable[[Case, str], bool] | None = None) -> None:
    """The command line of a benchmark module: each case's JAX and torch sides timed in their
    own processes, a progress line a case (stderr), a short table and the full results as JSON
    (`--json`, default `benchmarks/results/<machine>.json`, merged after every case, so a
    stopped run keeps the cases it finished); `--list` names the cases;
    `--gpu` runs `gpu_main(peak_gbs)` instead; `--processes N` times each side in N processes
    (`measure_sides`). `--only X` runs the cases for which
    `matches(case, X)` holds (e.g. X names their mechanism), else those whose name contains X;
    none is a usage error."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name contains this (or "
                        "of a mechanism of `flax-attention list`, where the module allows)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--json", default=os.path.join(RESULTS, machine_name() + ".json"),
                        help="where the full results go (default %(default)s)")
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile the JAX side with XLA's default options instead of "
                        "flax_attention.xla_options.compiler_options()")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="time each side in N fresh processes, alternating, and report the "
                        "median of their medians (default %(default)s)")
    parser.add_argument("--worker", nargs=2, metavar=("INDEX", "SIDE"), help=argparse.SUPPRESS)
    if gpu_main is not None:
        parser.add_argument("--gpu", action="store_true", help="the GPU comparison instead")
        parser.add_argument("--peak-gbs", type=float, help="the device's peak HBM GB/s")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(cases[int(args.worker[0])], args.worker[1])))
        return
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if getattr(args, "gpu", False):
        gpu_main(args.peak_gbs)
        return
    chosen = [i for i, case in enumerate(cases)
              if args.only and matches is not None and matches(case, args.only)]
    chosen = chosen or [i for i, case in enumerate(cases) if args.only in case.name]
    if not chosen:
        parser.error(f"--only {args.only!r} matches no benchmark case")
    if args.list:
        print("\n".join(cases[i].name for i in chosen))
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}"
          + (f", GLIBC_TUNABLES={tunables}" if tunables else ""))
    if args.xla_defaults:
        os.environ[XLA_DEFAULTS_ENV] = "1"  # the workers inherit it
    print(f"# {LEGEND}")
    print(f"# JAX programs compiled with {_options_label()}")
    print(HEADER, flush=True)
    for n, i in enumerate(chosen, 1):
        print(f"[{n}/{len(chosen)}] {cases[i].name} ...", file=sys.stderr, flush=True)
        jax_r, torch_r = measure_sides(i, module, args.processes)
        for mode in MODES:
            print(format_row(cases[i], mode, jax_r, torch_r), flush=True)
        write_results(args.json, result_records(cases[i], jax_r, torch_r))  # kept if stopped
    print(f"# full results: {args.json}")
