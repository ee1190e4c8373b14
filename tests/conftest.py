"""Test-wide settings: JAX on the CPU, quicker XLA compiles, full fp32 matmuls, deterministic
torch."""

import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Compile faster (most of the suite's time is XLA compiling small programs): LLVM's expensive
# optimisation passes off, and XLA:CPU's older fusion emitters, which compile about 30% faster.
# Neither changes the math, only at times the order of float32 sums (the 8-device training
# test's losses equal those of XLA's defaults to the last bit); benchmarks run without them. An
# XLA that does not know a flag aborts the process, so the flags are first tried in a subprocess,
# once per run: pytest-xdist's workers and the subprocesses that tests start (CLI, notebooks)
# inherit the result.
_FAST_COMPILE_FLAGS = ("--xla_llvm_disable_expensive_passes=true",
                       "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags: str) -> bool:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}"}
    probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          check=False).returncode == 0


def _accepted(flags: list[str]) -> list[str]:
    """All of `flags` if XLA takes them together (one probe), else those it takes one by one."""
    return flags if not flags or _xla_accepts(" ".join(flags)) else [
        f for f in flags if _xla_accepts(f)]


if "FLAX_ATTENTION_TEST_XLA_FLAGS" not in os.environ:  # once, in the first process of a run
    os.environ["FLAX_ATTENTION_TEST_XLA_FLAGS"] = " ".join(_accepted(
        [f for f in _FAST_COMPILE_FLAGS if f not in os.environ.get("XLA_FLAGS", "")]))
    os.environ["XLA_FLAGS"] = " ".join(
        (os.environ.get("XLA_FLAGS", ""), os.environ["FLAX_ATTENTION_TEST_XLA_FLAGS"])).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch is a test extra; tests that need it import it themselves
    import torch  # noqa: E402

    torch.manual_seed(0)
    # Two threads, or one a worker when pytest-xdist runs a worker per core.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // workers)))
except ImportError:  # pragma: no cover
    pass
