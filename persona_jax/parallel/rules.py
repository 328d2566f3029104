"""Weight shardings from regex rules: `[(regex over param paths, "replicate" | "fsdp"), ...]`.

"fsdp" shards a leaf over the mesh's `fsdp` axis along its largest dimension divisible by the
axis size (big_vision's fsdp tactic); leaves with no such dimension stay replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persona_jax import tree
from persona_jax.errors import ConfigError

TACTICS = ("replicate", "fsdp")


def spec_for(shape, tactic: str, fsdp_size: int) -> P:
  if tactic == "replicate" or fsdp_size == 1:
    return P()
  if tactic != "fsdp":
    raise ConfigError(f"sharding rule tactic '{tactic}' is not one of {', '.join(TACTICS)}")
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp_size == 0 and shape[d] >= fsdp_size:
      return P(*([None] * d + ["fsdp"]))
  return P()


def infer_shardings(abstract, rules: tree.Rules, mesh: Mesh, prefix: str = ""):
  """NamedShardings for every leaf of `abstract` (a tree of arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    tactic = tree.match(prefix + path, rules, "replicate")
    return NamedSharding(mesh, spec_for(leaf.shape, tactic, fsdp))
  if not abstract:
    return abstract
  return tree.map_with_path(one, abstract)


def shard_like(tree_, shardings):
  """device_put every leaf with its sharding."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree_, shardings)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def shardings_like_params(abstract, param_shardings, default):
  """Shardings for a tree holding param-shaped leaves (optimizer moments, accumulated grads):
  a leaf whose path ends with a param's full path (e.g. `.../mu/unet/conv_in/kernel`) gets that
  param's sharding; every other leaf (step counts) gets `default`."""
  by_path = tree.flatten(param_shardings)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for path, leaf in leaves:
    keys = [_key_str(k) for k in path]
    sharding = default
    for n in range(len(keys)):
      candidate = by_path.get("/".join(keys[n:]))
      if candidate is not None:
        sharding = candidate
        break
    out.append(sharding)
  return jax.tree_util.tree_unflatten(treedef, out)
