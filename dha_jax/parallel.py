"""Data parallelism: one jitted step over a 1-D device mesh.

The batch is sharded along the mesh axis `BATCH_AXIS`, everything else is
replicated, and XLA inserts the collectives: the step is written as if for one
device (global view), so gradients through the inner optimizer step need no
hand-written `pmean`. This is the current form of the design card's "pmapped
step" (`jax.pmap` now runs on jit + shard_map and is in maintenance mode).
BatchNorm statistics are therefore computed over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = 'batch'


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
  """Puts a PyTree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
