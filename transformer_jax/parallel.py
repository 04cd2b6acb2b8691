"""The JAX runtime of a run: CPU host devices, the compilation cache, `jax.distributed`, the
data mesh, its named shardings, and placing host arrays as global arrays.

Data parallelism is one `jax.jit` over global arrays: the batch's rows split along the mesh's
`data` axis, the state replicated. The CPU device count and the cache may be set
after importing this module: only JAX's first computation fixes them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from transformer_jax.config import Config
from transformer_jax.corpus import user_cache_dir
from transformer_jax.errors import UserError

AXIS = "data"


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_cpu_devices(config: Config) -> int:
    """One device per core, fewer where the cores do not divide a random batch."""
    cores, train = cpu_cores(), config.train
    if train.batching == "stream":  # stream rows are padded to any device count
        return cores
    fits = [d for d in range(1, cores + 1) if train.batch_size % (d * train.micro_batches) == 0]
    return max(fits, default=1)


def use_cpu_devices(n: int) -> None:
    """Give the CPU backend `n` devices (before JAX starts), unless XLA_FLAGS already does, or
    JAX already started in this process (a program called as a library): it keeps its own."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # "should be updated before backends are initialized"
            pass


def use_compile_cache() -> None:
    """Keep compiled programs on disk (JAX's persistent compilation cache) so that a rerun with
    the same shapes skips compilation: in $JAX_COMPILATION_CACHE_DIR if set, else in the user
    cache directory (~/.cache/transformer-jax/xla), at most 1 GB (least recently used go)."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(user_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", 1 << 30)


def start_distributed(coordinator: str | None, num_processes: int | None,
                      process_id: int | None) -> None:
    """Join a multi-process run through `jax.distributed` when the flags give one, or when the
    environment is a cluster JAX detects by itself (Cloud TPU pod, SLURM, Open MPI)."""
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given):
        if None in given:
            raise UserError("--coordinator, --num-processes and --process-id go together; "
                            "give all three (or none on a cluster JAX detects)")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
    elif _in_cluster():
        kwargs = {}
    else:
        return
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises runtime errors of several kinds
        where = f" at {coordinator}" if coordinator else ""
        raise UserError(f"cannot join the multi-process run{where}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def _in_cluster() -> bool:
    """Whether this process is one of several that a cluster launched (SLURM, Open MPI, or the
    workers of a Cloud TPU pod)."""
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def data_mesh(devices=None):
    """A 1-D mesh named `data` over `devices` (default: all devices).

    Auto axis type: the global-view step lets XLA place the collectives (the Explicit default
    of `jax.make_mesh` would demand sharding annotations on every embedding lookup).
    """
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh):
    """Every device holds the whole array (parameters, optimizer state, a token source)."""
    return NamedSharding(mesh, PartitionSpec())


def split_rows(mesh):
    """(B, ...) rows split over the devices: each holds B / devices of them."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def split_batches(mesh):
    """(N, B, ...) batches, each batch's B rows split over the devices."""
    return NamedSharding(mesh, PartitionSpec(None, AXIS))


def place(tree, sharding):
    """Host arrays, the same in every process, as global arrays laid out by `sharding`; each
    process copies only the shards of its own devices."""
    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree)


def is_lead() -> bool:
    """Whether this is process 0, which prints and writes what one process must."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"transformer-jax {name}")


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.process_allgather(np.int32(value)).max())
