"""Data parallelism: a mesh over every device, the batch split along it, the state replicated.

    initialize_distributed()             # multi-host: before anything else touches JAX
    mesh = data_mesh()                   # every visible device, one axis "data"
    check_batch_size(batch_size, mesh)
    state = replicated_init(lambda: init_fn(key), mesh)
    step = data_parallel(step_fn, mesh, num_batch_args=2, donate_state=True)
    state, loss = step(state, images, labels)

Under `jit` with these shardings XLA partitions the step: each device computes on its slice of
the batch and the gradient (and BatchNorm's batch statistics) are reduced over the mesh, so the
result is that of one device on the whole batch, up to the order of float sums. On several hosts
every process loads the same data set and builds the same global batch; `jax.device_put` of it
with `batch_sharding` keeps each process's own slices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_attention.xla_options import compiler_options

__all__ = ["DATA_AXIS", "batch_sharding", "check_batch_size", "data_mesh", "data_parallel",
           "describe_devices", "initialize_distributed", "replicated", "replicated_init", "to_host"]

DATA_AXIS = "data"


def initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when `JAX_COORDINATOR_ADDRESS` is set.

    The process count and id come from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when set,
    else from JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU). Call it before
    any other JAX call. Returns whether it initialised (False on one host, or if done before).
    """
    if not os.environ.get("JAX_COORDINATOR_ADDRESS") or jax.distributed.is_initialized():
        return False
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=None if count is None else int(count),
                               process_id=None if index is None else int(index))
    return True


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must not be empty")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def describe_devices(mesh: Mesh) -> str:
    """The devices and processes of `mesh` in words, e.g. "data parallel over 8 cpu devices in
    1 process"."""
    devices = mesh.devices.size
    platforms = "/".join(sorted({d.platform for d in mesh.devices.flat}))
    processes = len({d.process_index for d in mesh.devices.flat})
    return (f"data parallel over {devices} {platforms} device{'s' * (devices > 1)} in "
            f"{processes} process{'es' * (processes > 1)}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the mesh's "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """Raises ValueError unless `batch_size` is positive and divisible by the device count."""
    devices = mesh.devices.size
    if batch_size < 1 or batch_size % devices:
        raise ValueError(f"{name} ({batch_size}) must be a positive multiple of the number of "
                         f"devices ({devices}), since each device takes an equal slice")


def data_parallel(fn: Callable[..., Any], mesh: Mesh, num_batch_args: int,
                  donate_state: bool = False) -> Callable[..., Any]:
    """`fn(state, *batch) -> outputs` jitted for data parallelism on `mesh`.

    The state (first argument; parameters, optimiser state, ...) and every output are
    replicated, the `num_batch_args` batch arguments split along their leading axis; the state
    is donated (its buffers reused for the outputs) when `donate_state`. Compiled with the
    library's options for the mesh's platform (`xla_options.compiler_options`).
    """
    rep, batch = replicated(mesh), batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, *[batch] * num_batch_args), out_shardings=rep,
                   donate_argnums=(0,) if donate_state else (),
                   compiler_options=compiler_options(mesh.devices.flat[0].platform))


def replicated_init(fn: Callable[[], Any], mesh: Mesh) -> Any:
    """`fn()` (e.g. parameter initialisation) jitted, its outputs replicated over `mesh`.

    It runs with the threefry generator that is not partitionable, which compiles several
    times faster (seconds on a CPU); replicated outputs have nothing to partition.
    """
    with jax.threefry_partitionable(False):
        return jax.jit(fn, out_shardings=replicated(mesh))()


def to_host(tree: Any) -> Any:
    """A replicated pytree as numpy arrays: this process's copy (works on several hosts, where
    `jax.device_get` of an array spanning other processes fails)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
