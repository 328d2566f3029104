"""Several JAX processes running one program: one per host of a TPU pod slice or a multi-node GPU
job (JAX's multi-controller model; here on localhost with CPU devices and gloo collectives).

`start` calls `jax.distributed.initialize` before anything touches a device: with the three
`--coordinator-address HOST:PORT --num-processes N --process-id I` flags (all or none), else
where a cluster is detected (SLURM, Open MPI, Cloud TPU VMs, GKE TPU pods: JAX's own detection
then fills them in), else not at all (one process). Every process then runs the same command on
the same shared workdir (GCS FUSE or NFS on a pod) and must make the same calls in the same order:
each compiled step over the global mesh, each `sync`, each `to_host` of a sharded array and each
`map_over_processes` is a collective.

Process 0 (`is_main`) writes every output (results, exports, grids, metrics, class images;
orbax checkpoints are written by all, as orbax does), logs at INFO and shows progress bars; the
others log warnings and errors only, tagged with their index.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import numpy as np

from persona_jax.errors import ConfigError

log = logging.getLogger(__name__)

FLAGS = ("coordinator_address", "num_processes", "process_id")


def detected_cluster() -> str | None:
  """The name of the cluster JAX's auto-detection would configure (SlurmCluster, OmpiCluster,
  GceTpuCluster, GkeTpuCluster), or None. mpi4py and Kubernetes are left out (they need an
  opt-in and a package)."""
  try:
    from jax._src import clusters
    kinds = clusters.ClusterEnv._cluster_types
  except (ImportError, AttributeError):         # JAX moved its private detection: no auto-start
    return None
  for kind in kinds:
    if kind.__name__ in ("Mpi4pyCluster", "K8sCluster"):
      continue
    try:
      if kind.is_env_present():
        return kind.__name__
    except Exception:                           # a failed probe is not a cluster
      continue
  return None


def start(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, heartbeat_timeout: int | None = None) -> int:
  """Starts JAX's distributed runtime when asked for (all three values) or when a cluster is
  detected; returns the process count. Must run before any JAX computation."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    missing = [f"--{f.replace('_', '-')}" for f, g in zip(FLAGS, given) if not g]
    raise ConfigError(f"{', '.join(missing)}: several processes need all of --coordinator-address, "
                      "--num-processes and --process-id (or none, on a cluster JAX detects)")
  if all(given):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process-id {process_id}: must be in 0 .. --num-processes - 1 "
                        f"({num_processes} processes)")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"--coordinator-address {coordinator_address}: expected HOST:PORT "
                        "(e.g. 10.0.0.2:8476), the same on every process")
  cluster = None if all(given) else detected_cluster()
  if not all(given) and cluster is None:
    if heartbeat_timeout is not None:
      log.warning("--heartbeat-timeout: one process (no --coordinator-address and no cluster "
                  "detected); ignored")
    return 1
  kwargs = {} if heartbeat_timeout is None else {"heartbeat_timeout_seconds": heartbeat_timeout}
  if all(given):
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  _tag_logs()
  log.info("process %d of %d%s: %d local device(s), %d in all", jax.process_index(),
           jax.process_count(), f" ({cluster})" if cluster else "", jax.local_device_count(),
           jax.device_count())
  return jax.process_count()


def _tag_logs() -> None:
  """Log lines carry the process index; processes other than 0 log warnings and errors only."""
  index, count = jax.process_index(), jax.process_count()
  if count == 1:
    return
  for handler in logging.getLogger().handlers:
    handler.setFormatter(logging.Formatter(
        f"%(levelname).1s %(name)s [process {index}/{count}]: %(message)s"))
  if index != 0:
    logging.getLogger("persona_jax").setLevel(logging.WARNING)


def is_main() -> bool:
  """True on process 0, the one that writes outputs and shows progress."""
  return jax.process_index() == 0


_barriers = 0              # barriers passed: every process counts the same, so ids match


def sync(name: str, timeout_s: int = 3600) -> None:
  """A barrier of all processes (nothing with one), through the coordination service, so a
  process may wait up to `timeout_s` while another writes (a collective would time out: gloo's
  after 30 s)."""
  global _barriers
  if jax.process_count() == 1:
    return
  _barriers += 1
  try:
    from jax._src.distributed import global_state
    client = global_state.client
  except (ImportError, AttributeError):          # JAX moved it: a collective barrier instead
    client = None
  if client is None:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"persona_jax: {name}")
    return
  client.wait_at_barrier(f"persona_jax_{_barriers}_{name.replace(' ', '_')}", timeout_s * 1000)


def to_host(tree):
  """Numpy copies of every leaf on every process: global arrays sharded across processes are
  gathered (a collective: every process must call it), replicated ones read locally."""
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def map_over_processes(fn: Callable[[object], np.ndarray], items: Sequence) -> list[np.ndarray]:
  """[fn(item) for item in items], item k computed by process k % N and every result gathered on
  every process. `fn` returns arrays of one shape and dtype for every item and runs no
  collective; with one process it simply runs in order, and so does a call inside `fn`."""
  global _mapping
  count = jax.process_count()
  if count == 1 or _mapping:            # one process, or inside another map: this process's item
    return [fn(item) for item in items]
  _mapping = True
  try:
    return _gathered(fn, items, count)
  finally:
    _mapping = False


_mapping = False           # inside map_over_processes: a nested call runs locally


def _gathered(fn, items, count):
  from jax.experimental import multihost_utils
  index, out = jax.process_index(), []
  for first in range(0, len(items), count):
    k = min(first + index, len(items) - 1)       # the last round's idle processes redo the last
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(fn(items[k]))))
    out += [gathered[p] for p in range(min(count, len(items) - first))]
  return out


__all__ = ["detected_cluster", "is_main", "map_over_processes", "start", "sync", "to_host"]
