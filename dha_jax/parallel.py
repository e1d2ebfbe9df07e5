"""Data parallelism: one jitted step over a 1-D device mesh of all processes.

The batch is sharded along the mesh axis `BATCH_AXIS`, everything else is
replicated, and XLA inserts the collectives: the step is written as if for one
device (global view), so gradients through the inner optimizer step need no
hand-written `pmean`. This is the current form of the design card's "pmapped
step" (`jax.pmap` now runs on jit + shard_map and is in maintenance mode).
BatchNorm statistics are therefore computed over the global batch.

In a multi-process run (a TPU pod slice, several GPU hosts; `jax.distributed`
initialised by `dha_jax.main`) the mesh spans every process's devices; each
process feeds its slice of every batch and process 0 alone writes files.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = 'batch'


def is_primary_process() -> bool:
  """Whether this process writes the run's files: process 0 of a
  multi-process run (all processes compute; one writes)."""
  return jax.process_index() == 0


def process_slice() -> dict[str, int]:
  """This process's place among all: which slice of every global batch it
  reads (`data.train_batches` / `eval_batches` keyword arguments)."""
  return {'process_index': jax.process_index(),
          'process_count': jax.process_count()}


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on some process; every process gets the answer,
  so that they all take the same branch (one SIGTERM stops them all)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def wait_for_all_processes(name: str) -> None:
  """A barrier: returns once every process has reached it."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (or the given) devices, axis `BATCH_AXIS`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the devices."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Puts a host batch (a PyTree of numpy arrays) on the mesh, batch-sharded.

  Each process passes its local part; with one process that is the whole
  global batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Puts a PyTree on every device of the mesh.

  With several processes, an array of this process's devices alone goes
  through the host first (every process holds the same value), since JAX
  does not reshard a process-local array onto a global mesh.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                        and x.is_fully_addressable else x, tree)
  return jax.device_put(tree, replicated(mesh))
