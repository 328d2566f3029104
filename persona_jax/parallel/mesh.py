"""The ("data", "fsdp") mesh over all devices and the batch sharding.

Batches are split over both axes (every device gets distinct examples); weights are replicated
unless a sharding rule (parallel/rules.py) puts them on the `fsdp` axis.
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
