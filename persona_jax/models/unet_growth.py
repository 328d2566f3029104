"""Deepening a trained UNet without changing what it computes (net2net-style growth).

A level of the UNet gets more layers (diffusers' per-block `layers_per_block`): each new
down-block layer is a resnet whose `conv2` and a transformer whose `proj_out` start at zero, so
both are the identity; each new up-block layer consumes the duplicated skip that the new down
layer pushes, and starts as the identity too (its `conv_shortcut` passes the incoming hidden
state through and drops the skip). Training then uses the new capacity from where the small
model stood (the toy base's pre-training continues this way instead of starting over).

Up block of a level that grows from L to L + D layers consumes, in order, the skips
r_{L+D-1} ... r_L (all equal to r_{L-1} at the start), r_{L-1} ... r_0 and the level below's
output; its resnet 0 (the only one reading the block below's width) stays resnet 0, the D new
ones come next, and old resnet k >= 1 becomes resnet k + D, each reading the skip it read before.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np

from persona_jax import tree
from persona_jax.errors import ConfigError
from persona_jax.models.configs import UNetConfig


def deepen(raw_config: dict, params: dict, layers: Sequence[int],
           seed: int = 0) -> tuple[dict, dict]:
  """A deeper UNet computing the same function.

  Args:
    raw_config: the UNet's diffusers config.json object.
    params: its param tree (float arrays).
    layers: the new layers per block, one per level, each at least the current count.
    seed: for the new layers' other weights (they start as the identity regardless).
  Returns:
    (the new config.json object, with a per-block `layers_per_block`; the new param tree).
  """
  from persona_jax.models.components import abstract_params
  old = UNetConfig.from_dict(raw_config)
  old_layers = old.layers_per_block_list
  layers = tuple(int(n) for n in layers)
  if len(layers) != len(old_layers) or any(n < o for n, o in zip(layers, old_layers)):
    raise ConfigError(f"layers per block {list(layers)}: give one count per level "
                      f"({len(old_layers)}), none below the current {list(old_layers)}")
  new_raw = {**raw_config, "layers_per_block": list(layers)}
  shapes = tree.flatten(abstract_params("unet", UNetConfig.from_dict(new_raw)))
  rng = np.random.default_rng(seed)
  source = tree.flatten(jax.tree.map(np.asarray, params))
  out = {}
  n = len(layers)
  for path, leaf in shapes.items():
    origin = _origin(path, old_layers, layers, n)
    if origin is not None:
      if source[origin].shape != leaf.shape:
        raise ValueError(f"{origin}: shape {source[origin].shape} does not fit {path} "
                         f"{leaf.shape}")
      out[path] = source[origin]
    else:
      out[path] = _as_identity(path, _fresh(path, leaf.shape, leaf.dtype, rng))
  missing = set(source) - {_origin(p, old_layers, layers, n) for p in shapes}
  if missing:
    raise ValueError(f"params not carried into the deeper UNet: {sorted(missing)[:3]}")
  return new_raw, tree.unflatten(out)


def _origin(path: str, old_layers, layers, n: int) -> str | None:
  """The old param a new param copies, or None for a new layer's param."""
  parts = path.split("/")
  block = re.fullmatch(r"(down|up)_blocks_(\d+)", parts[0])
  if block is None or not re.fullmatch(r"(resnets|attentions)_\d+", parts[1]):
    return path                                   # outside the blocks, or a down/upsampler
  kind, j = parts[1].rsplit("_", 1)
  level = int(block[2]) if block[1] == "down" else n - 1 - int(block[2])
  j, grown = int(j), layers[level] - old_layers[level]
  if block[1] == "down":
    k = j if j < old_layers[level] else None
  else:
    k = 0 if j == 0 else (None if j <= grown else j - grown)
  return None if k is None else "/".join([parts[0], f"{kind}_{k}", *parts[2:]])


def _fresh(path: str, shape, dtype, rng: np.random.Generator) -> np.ndarray:
  """flax's default initialization of a new leaf: LeCun-normal kernels, unit norm scales, zero
  biases (numpy: nothing to compile)."""
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":
    fan_in = int(np.prod(shape[:-1]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
  return (np.ones if name == "scale" else np.zeros)(shape, dtype)


def _as_identity(path: str, value: np.ndarray) -> np.ndarray:
  """A new layer's param, set so that the layer passes its input through."""
  name = path.split("/")
  if "conv2" in name or "proj_out" in name:                # resnet residual / transformer output
    return np.zeros_like(value)
  if "conv_shortcut" in name:                              # up-block resnet: [hidden, skip] -> hidden
    if name[-1] == "bias":
      return np.zeros_like(value)
    eye = np.zeros_like(value)                             # [1, 1, hidden + skip, hidden]
    width = value.shape[-1]
    eye[0, 0, :width, :] = np.eye(width, dtype=value.dtype)
    return eye
  return value
