"""Several devices and processes through JAX's own machinery: ``jax.distributed``, meshes, shardings.

Two ways of splitting work, both on a one-axis ``jax.sharding.Mesh``:

* **Data parallelism** (training, evaluation): each device takes its rows of a batch
  (``NamedSharding(mesh, P(axis))``); parameters, optimiser state and EMA are replicated
  (``P()``); the loss's sums over the batch become XLA all-reduces, so the loss and its gradient
  equal the one-device ones. Every process reads and prepares the whole dataset and builds the same
  global batch (the order is a function of seed and epoch), then hands JAX only the rows its own
  devices hold (:func:`global_batch`).
* **Atom decomposition** (MD): every device holds all positions and the whole neighbour list and
  computes the energy of its own block of centre atoms inside ``jax.shard_map``
  (:mod:`a2ijax.potential`, ``mesh=``); the total is a ``psum``.

Processes are joined with :func:`initialize` (``jax.distributed``); with one process nothing here
needs it. Collectives are XLA's: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from a2ijax.errors import InputError

CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")  # launchers jax.distributed detects


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
    """Whether a launcher JAX detects by itself (Slurm, Open MPI) started more than one process."""
    environ = os.environ if environ is None else environ
    for name in CLUSTER_SIZE_VARIABLES:
        try:
            if int(environ.get(name, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to a multi-process JAX run; returns whether it did.

    With ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id`` given,
    ``jax.distributed.initialize`` is called with them; with none given, it is called without
    arguments when a Slurm or Open MPI launch of several processes is detected (JAX reads the
    cluster's variables), and not at all otherwise. Call it before anything touches a device.
    """
    given = (coordinator, num_processes, process_id)
    if all(x is None for x in given):
        if not cluster_detected():
            return False
        jax.distributed.initialize()
        return True
    if any(x is None for x in given):
        raise InputError("give all of coordinator (HOST:PORT), num_processes and process_id, or none of them "
                         f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r})")
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"coordinator must be HOST:PORT with a port in 1..65535, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise InputError(f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
                         f"num_processes={num_processes}, process_id={process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def is_main_process() -> bool:
    """Process 0 writes reports, metrics and progress; the others compute."""
    return jax.process_index() == 0


def make_mesh(devices: int | None = None, axis: str = "data") -> Mesh:
    """A one-axis mesh (axis type Auto: shardings propagate under ``jit``).

    ``devices`` None: every device of every process; a number: the first that many devices of this
    process (one process only, for MD on some of a machine's devices).
    """
    if devices is None:
        chosen = jax.devices()
    else:
        if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
            raise InputError(f"devices must be an integer >= 1, got {devices!r}")
        local = jax.local_devices()
        if devices > len(local):
            raise InputError(f"asked for {devices} devices, this process has {len(local)} ({local[0].platform}); on "
                             "a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices")
        if jax.process_count() > 1 and devices != len(local):
            raise InputError("with several processes every device takes part: leave devices unset")
        chosen = local[:devices]
    return Mesh(np.asarray(chosen), (axis,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_leading(mesh: Mesh) -> NamedSharding:
    """The leading axis split over the mesh's axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """``rows`` rounded up to a multiple of the mesh's device count (batches are filled up with rows
    of weight 0 so that every device gets the same number)."""
    return rows if mesh is None else math.ceil(rows / mesh.size) * mesh.size


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A host batch (the same on every process) as global arrays split by rows over ``mesh``; each
    process supplies only its own devices' rows."""
    sharding = split_leading(mesh)
    for name, value in batch.items():
        if np.shape(value)[0] % mesh.size:
            raise InputError(f"batch field {name!r} has {np.shape(value)[0]} rows, not a multiple of the "
                             f"{mesh.size} devices; fill it up (padded_rows)")
    return {name: _global(value, sharding) for name, value in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` (the same on every process) replicated on every device of ``mesh``."""
    sharding = replicated(mesh)

    def place(x: Any) -> jax.Array:
        # The same sharding object, not just an equivalent one: jit keys its cache on the sharding,
        # and a one-device array fed where replicated outputs come back would compile twice.
        if isinstance(x, jax.Array) and (x.sharding == sharding or not x.is_fully_addressable):
            return x
        return _global(np.asarray(x), sharding)

    return jax.tree_util.tree_map(place, tree)
