"""Test-wide settings: JAX on the CPU, quicker XLA compiles, full fp32 matmuls, deterministic
torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Compile faster: LLVM's expensive optimisation passes off (the suite about 20% faster; the
# tests check values, which these passes do not change; benchmarks run without the flag).
# Subprocesses started by the tests (CLI, notebooks) inherit it.
if "xla_llvm_disable_expensive_passes" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_llvm_disable_expensive_passes=true").strip()

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
