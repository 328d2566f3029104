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


def optimizer_shardings(tx, abstract_opt_state, param_shardings, default):
  """Shardings of an optimizer state: every copy of the param tree inside it (Adam's moments,
  accumulated gradients, EMA-like traces) takes the params' shardings, found by the optimizer's
  own structure (`optax.tree_map_params`), every other leaf (step counts) `default`. Groups'
  masked-out subtrees (`optax.MaskedNode`) stay as they are."""
  import optax
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(tx, lambda value, sharding: value if masked(value) else sharding,
                               abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: default, is_leaf=masked)
