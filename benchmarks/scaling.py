"""How the quadratic attentions scale: time and peak memory against the map size H = W.

`python -m benchmarks.scaling [--sizes 32,64,97,128,192] [--modes fwd,fwd+bwd] [--max-gib 16]
[--out benchmarks/results/scaling.md]`

The ops, at B = 1, 512 value channels and 64 query/key channels, with their theoretical cost:
criss-cross HW (H + W) (time exponent 1.5 in HW), PAM and non-local (HW)^2 (exponent 2; the
non-local keys are sub-sampled 2x2, as `NonLocal2D` does by default), CAM HW C^2 (exponent 1).
Each (op, side, size) runs in its own process: after one untimed call (compilation), the median
of at least three calls (more while under 2 s). Peak memory: the growth of the process's
resident set over one call (VmHWM after a reset, minus VmRSS before), torch's first call and
JAX's first after compilation; it undercounts memory reused from an earlier step (fwd+bwd runs
after fwd). For JAX also XLA's compiled temporaries (`memory_analysis().temp_size_in_bytes`).
Workers run under an address-space limit of `--max-gib` GiB (0: none), so a side that needs
more fails with "out of memory" instead of starving the machine. The fitted exponent is the
least-squares slope of log time against log HW over the sizes measured. Without `--sizes` the
whole table is run (long: at 192x192 torch's PAM map alone is 5.4 GB); `benchmarks.run` takes
`CASES`, the quick sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.harness import Case, jax_steps, torch_steps

QK, CHANNELS = 64, 512
SIZES = (32, 64, 97, 128, 192)
QUICK_SIZES = (32, 64)
MODES = ("fwd", "fwd+bwd")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling.md")


def _normal(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 0.1


def _nchw(*arrays: np.ndarray) -> list:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))) for a in arrays]


def _maps(side: int) -> list[np.ndarray]:
    """q, k `[1, H, W, QK]` and v `[1, H, W, CHANNELS]`."""
    return [_normal(1, side, side, c) for c in (QK, QK, CHANNELS)]


def _sequences(side: int) -> list[np.ndarray]:
    """The non-local op's theta `[1, HW, QK]`, phi `[1, HW/4, QK]`, g `[1, HW/4, CHANNELS]`."""
    keys = (side // 2) ** 2
    return [_normal(1, side * side, QK), _normal(1, keys, QK), _normal(1, keys, CHANNELS)]


def _jax_fn(op: str):
    from flax_attention.functional.criss_cross import criss_cross_attention
    from flax_attention.functional.danet import channel_attention, position_attention
    from flax_attention.functional.non_local import non_local

    return {"criss-cross": criss_cross_attention, "PAM": position_attention,
            "non-local": non_local, "CAM": channel_attention}[op]


def _torch_fn(op: str):
    import torch

    from tests.reference import criss_cross, danet

    def non_local(theta, phi, g):
        return torch.softmax(theta @ phi.transpose(1, 2), dim=-1) @ g

    return {"criss-cross": criss_cross.criss_cross_attention, "PAM": danet.pam,
            "non-local": non_local, "CAM": danet.cam}[op]


def _inputs(op: str, side: int, torch_layout: bool) -> list:
    if op == "non-local":
        arrays = _sequences(side)
        if torch_layout:
            import torch

            return [torch.from_numpy(a) for a in arrays]
        return arrays
    arrays = [_normal(1, side, side, CHANNELS)] if op == "CAM" else _maps(side)
    return _nchw(*arrays) if torch_layout else arrays


def jax_setup(op: str, side: int) -> dict:
    return jax_steps(_jax_fn(op), *_inputs(op, side, False))


def torch_setup(op: str, side: int) -> dict:
    return torch_steps(_torch_fn(op), *_inputs(op, side, True))


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    theory: float  # the exponent of time in HW
    cost: str


OPS = (Op("criss-cross", 1.5, "HW (H + W)"), Op("PAM", 2.0, "(HW)^2"),
       Op("non-local", 2.0, "(HW)^2"), Op("CAM", 1.0, "HW C^2"))

CASES = [
    Case(f"scaling {op.name} {s}x{s}", functools.partial(jax_setup, op.name, s),
         functools.partial(torch_setup, op.name, s))
    for op in OPS for s in QUICK_SIZES
]


# --- one side of one size, in its own process -------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _timed(thunk) -> tuple[float, float, float]:
    """(wall ms of one call, CPU ms of all the process's threads, growth of the resident set
    over it in MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    thunk()
    ms, cpu_ms = (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3
    return ms, cpu_ms, (_status_kib("VmHWM") - before) / 1024


def _jax_temp_mib(op: str, side: int, mode: str) -> float:
    """XLA's compiled temporaries of the step, in MiB."""
    import jax
    import jax.numpy as jnp

    fn, args = _jax_fn(op), _inputs(op, side, False)
    step = fn if mode == "fwd" else jax.value_and_grad(lambda *a: jnp.sum(fn(*a)),
                                                       argnums=tuple(range(len(args))))
    analysis = jax.jit(step).lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20


def worker(op: str, side_name: str, side: int, modes: list[str], max_gib: float) -> dict:
    if max_gib:
        limit = int(max_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    setup = jax_setup if side_name == "jax" else torch_setup
    thunks, result = setup(op, side), {}
    for mode in modes:
        try:
            # torch's peak is taken over its first call, before it reuses memory already
            # resident; JAX's over the first call after compilation (XLA's temp is exact)
            torch_peak = _timed(thunks[mode])[2]
            calls = [_timed(thunks[mode])]
            while len(calls) < 3 or (len(calls) < 20 and sum(c[0] for c in calls) < 2000):
                calls.append(_timed(thunks[mode]))
            result[mode] = {"ms": statistics.median(c[0] for c in calls),
                            "cpu_ms": statistics.median(c[1] for c in calls),
                            "peak_mib": torch_peak if side_name == "torch" else calls[0][2]}
            if side_name == "jax":
                result[mode]["temp_mib"] = _jax_temp_mib(op, side, mode)
        except (MemoryError, RuntimeError) as err:  # torch and XLA report running out so
            result[mode] = {"error": _oom(str(err), max_gib)}
    return result


def _oom(message: str, max_gib: float) -> str:
    memory = ("memory" in message.lower() or "RESOURCE_EXHAUSTED" in message)
    return f"out of memory (> {max_gib:g} GiB)" if memory else message.splitlines()[0][:80]


def _measure(op: str, side_name: str, side: int, modes: list[str], max_gib: float) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE",
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", op, side_name, str(side),
           ",".join(modes), str(max_gib)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "killed"
        return {mode: {"error": _oom(tail, max_gib)} for mode in modes}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the table ---------------------------------------------------------------------------------


def fitted_exponent(sides: list[int], ms: list[float]) -> float:
    """Least-squares slope of log(ms) against log(HW)."""
    return float(np.polyfit(np.log([s * s for s in sides]), np.log(ms), 1)[0])


def _cell(r: dict) -> str:
    if "error" in r:
        return r["error"]
    temp = f", XLA temp {r['temp_mib']:.0f}" if "temp_mib" in r else ""
    return f"{r['ms']:.1f} ms (CPU {r['cpu_ms']:.0f}), {r['peak_mib']:.0f} MiB{temp}"


def _exponent(results: dict, side_name: str, mode: str) -> str:
    """The fitted exponents of wall and CPU time, "wall / CPU"."""
    cells = [r[side_name].get(mode, {}) for r in results.values()]
    sides = [s for s, c in zip(results, cells, strict=True) if "ms" in c]
    if len(sides) < 2:
        return "-"
    return " / ".join(f"{fitted_exponent(sides, [c[key] for c in cells if 'ms' in c]):.2f}"
                      for key in ("ms", "cpu_ms"))


def table(op: Op, results: dict, modes: list[str]) -> list[str]:
    """Markdown rows of one op: a row per size and mode, then the fitted exponents."""
    rows = [f"### {op.name}: time ~ {op.cost}, theoretical exponent in HW {op.theory:g}", "",
            "| H = W | mode | JAX | torch | torch / JAX |", "| --- | --- | --- | --- | --- |"]
    for side, r in results.items():
        for mode in modes:
            j, t = r["jax"][mode], r["torch"][mode]
            ratio = (f"{t['ms'] / j['ms']:.2f}x (CPU {t['cpu_ms'] / j['cpu_ms']:.2f}x)"
                     if "ms" in j and "ms" in t else "-")
            rows.append(f"| {side} | {mode} | {_cell(j)} | {_cell(t)} | {ratio} |")
    for mode in modes:
        rows.append(f"| fitted exponent (wall / CPU) | {mode} | "
                    f"{_exponent(results, 'jax', mode)} | {_exponent(results, 'torch', mode)} | "
                    f"theory {op.theory:g} |")
    return [*rows, ""]


def _noisy() -> str:
    """A warning when the load average is above the CPU count."""
    return (" (above the CPU count, times are noisy)"
            if os.getloadavg()[0] > (os.cpu_count() or 1) else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="H = W values, comma-separated (default %(default)s; quick: 32,64)")
    parser.add_argument("--modes", default=",".join(MODES), help="default %(default)s")
    parser.add_argument("--ops", default=",".join(op.name for op in OPS),
                        help="default %(default)s")
    parser.add_argument("--max-gib", type=float, default=16.0,
                        help="address-space limit of each worker in GiB, 0 for none "
                             "(default %(default)s)")
    parser.add_argument("--out", default=OUT, help="markdown results (default %(default)s)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        op, side_name, side, modes, max_gib = args.worker
        print(json.dumps(worker(op, side_name, int(side), modes.split(","), float(max_gib))))
        return
    sizes, modes = [int(s) for s in args.sizes.split(",")], args.modes.split(",")
    ops = [op for op in OPS if op.name in args.ops.split(",")]
    command = "python -m benchmarks.scaling " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    lines = [f"# Scaling of the quadratic attentions ({time.strftime('%Y-%m-%d')})", "",
             f"`{command.strip()}` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; B = 1, {CHANNELS} value channels, query/key {QK}. "
             "Time: median wall ms of one step (and the CPU ms of the process's threads, "
             "steadier than wall time on a shared machine); memory: growth of the process's "
             "resident set over one step (and XLA's compiled temporaries for JAX). Each cell "
             "its own process, "
             f"limited to {args.max_gib:g} GiB of address space (0: none). Load average at "
             f"the start: {os.getloadavg()[0]:.1f}{_noisy()}.", ""]
    for op in ops:
        results = {}
        for side in sizes:
            print(f"{op.name} {side}x{side} ...", file=sys.stderr, flush=True)
            results[side] = {name: _measure(op.name, name, side, modes, args.max_gib)
                             for name in ("jax", "torch")}
        rows = table(op, results, modes)
        print("\n".join(rows), flush=True)
        lines += rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"# written to {args.out}")


if __name__ == "__main__":
    main()
