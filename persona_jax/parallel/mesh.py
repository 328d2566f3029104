"""The ("data", "fsdp") mesh over all devices and the batch sharding.

Batches are split over both axes (every device gets distinct examples); weights are replicated
unless a sharding rule (parallel/rules.py) puts them on the `fsdp` axis. With several processes
the mesh spans every process's devices (so may the `fsdp` axis); each process holds one
contiguous block of every batch's rows (`process_block`), loads only those and `global_batch`
assembles the global array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persona_jax.errors import ConfigError

AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A (num_devices // fsdp, fsdp) mesh named ("data", "fsdp")."""
  devices = list(devices if devices is not None else jax.devices())
  if fsdp < 1 or len(devices) % fsdp:
    raise ConfigError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, class_rows: int = 0) -> None:
  """The step's rows (`batch_size` instance rows + `class_rows`) must split over the devices."""
  rows = batch_size + class_rows
  if rows % mesh.size:
    what = (f"batch_size {batch_size}" if not class_rows else
            f"the step's batch (batch_size {batch_size} + {class_rows} class rows = {rows})")
    raise ConfigError(f"{what} is not divisible by the {mesh.size} devices; use a multiple of "
                      "the device count")


def process_block(mesh: Mesh) -> tuple[int, int]:
  """(i, n): this process's devices hold block i of n equal, contiguous blocks of the rows of
  a batch sharded by `batch_sharding` ((0, 1) with one process)."""
  n = jax.process_count()
  if n == 1:
    return 0, 1
  spans = sorted((s[0].start, s[0].stop) for s in
                 batch_sharding(mesh).addressable_devices_indices_map((mesh.size,)).values())
  lo, hi = spans[0][0], spans[-1][1]
  if (hi - lo) * n != mesh.size or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ConfigError(f"process {jax.process_index()}: its devices do not hold one contiguous "
                      "block of the batch rows in this mesh; give every process the same number "
                      "of devices")
  return lo // (hi - lo), n


def global_batch(mesh: Mesh, local: dict, rows: int) -> dict:
  """The global [rows, ...] arrays of a batch, sharded by `batch_sharding`, from this process's
  `process_block` of each (every process passes its own block)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (rows,) + np.shape(v)[1:])
          for k, v in local.items()}
