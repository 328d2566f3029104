"""PyTorch state dicts (diffusers / transformers names) <-> persona_jax param trees, both ways.

The key table is explicit and derived from the model itself: `key_table(abstract)` walks the
abstract param tree of a component (`jax.eval_shape` of its init: shapes only, no weights are
initialized) and gives, for every PyTorch key, the Flax path, the expected shape and the array
transform. Loading then checks the file against that table: every expected key present, no
unexpected key, every shape right, each error naming the file and the key.

Name rules (reference/formats.md 2.5):
  * a path segment `name_N` of a list container (`down_blocks_0`, `resnets_1`, `to_out_0`,
    `net_2`, `layers_11`, ...) is `name.N` in PyTorch; other names (`linear_1`) stay;
  * leaves: Dense `kernel` (in, out) <-> `weight` (out, in), transposed; Conv `kernel`
    (kh, kw, in, out) <-> `weight` (out, in, kh, kw); norm `scale` and `embedding` <-> `weight`;
    a bare parameter keeps its name (CLIP vision's `embeddings/class_embedding`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from persona_jax.errors import ModelFileError

LIST_CONTAINERS = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
    "upsamplers", "to_out", "net", "layers",
})
_LIST_SEGMENT = re.compile(r"^(.*)_(\d+)$")
_WEIGHT_LEAVES = frozenset({"kernel", "scale", "embedding"})     # `bias` and bare params keep names


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the key table."""
  path: tuple[str, ...]           # Flax path
  shape: tuple[int, ...]          # Flax shape
  kind: str                       # "linear" | "conv" | "copy"

  def torch_shape(self) -> tuple[int, ...]:
    if self.kind == "linear":
      return self.shape[::-1]
    if self.kind == "conv":
      kh, kw, i, o = self.shape
      return (o, i, kh, kw)
    return self.shape


def torch_name(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = []
  for seg in path[:-1]:
    m = _LIST_SEGMENT.match(seg)
    parts.append(f"{m[1]}.{m[2]}" if m and m[1] in LIST_CONTAINERS else seg)
  parts.append("weight" if path[-1] in _WEIGHT_LEAVES else path[-1])
  return ".".join(parts)


def key_table(abstract_params) -> dict[str, Entry]:
  """{torch key: Entry} for every leaf of an (abstract) Flax param tree."""
  table = {}
  for path, leaf in flatten_dict(abstract_params).items():
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      kind = {2: "linear", 4: "conv"}[len(shape)]
    else:
      kind = "copy"
    table[torch_name(path)] = Entry(path, shape, kind)
  return table


def _to_flax_array(w: np.ndarray, entry: Entry) -> np.ndarray:
  if entry.kind == "linear":
    return w.T
  if entry.kind == "conv":
    return w.transpose(2, 3, 1, 0)
  return w


def _to_torch_array(w: np.ndarray, entry: Entry) -> np.ndarray:
  if entry.kind == "linear":
    return w.T
  if entry.kind == "conv":
    return w.transpose(3, 2, 0, 1)
  return w


Adapter = Callable[[str, np.ndarray, Mapping[str, Entry]], tuple[str, np.ndarray] | None]


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params, *, source: str,
                         dtype=None, adapt: Adapter | None = None, ignore: Callable[[str], bool] = None):
  """Converts a PyTorch state dict to a Flax param tree, checking it against the key table.

  Args:
    state_dict: {torch key: array} as read from the file(s).
    abstract_params: the component's abstract param tree (from `jax.eval_shape`).
    source: the file(s) the state dict came from, for error messages.
    dtype: cast every array to this dtype (None keeps the file's).
    adapt: optional per-key rewrite (old names, 4-D 1x1 attention weights) returning
      (canonical key, array), or None to keep the key as it is.
    ignore: predicate for keys that are not weights (buffers like `position_ids`).
  Raises:
    ModelFileError naming the source and the first offending keys.
  """
  table = key_table(abstract_params)
  flat, unexpected = {}, []
  for key, w in state_dict.items():
    if ignore is not None and ignore(key):
      continue
    if adapt is not None:
      adapted = adapt(key, w, table)
      if adapted is not None:
        key, w = adapted
    entry = table.get(key)
    if entry is None:
      unexpected.append(key)
      continue
    if tuple(w.shape) != entry.torch_shape():
      raise ModelFileError(f"{source}: tensor '{key}' has shape {tuple(w.shape)}, the config "
                           f"needs {entry.torch_shape()}; is config.json from the same model?")
    w = _to_flax_array(np.asarray(w), entry)
    flat[entry.path] = w if dtype is None else w.astype(dtype)
  missing = [k for k, e in table.items() if e.path not in flat]
  if missing:
    raise ModelFileError(f"{source}: {len(missing)} weight(s) missing, e.g. '{missing[0]}'"
                         + (f", '{missing[1]}'" if len(missing) > 1 else "")
                         + "; the file does not match config.json")
  if unexpected:
    raise ModelFileError(f"{source}: {len(unexpected)} unexpected tensor(s), e.g. '{unexpected[0]}'"
                         + (f", '{unexpected[1]}'" if len(unexpected) > 1 else "")
                         + "; the file does not match config.json or is not a model of this kind")
  return unflatten_dict(flat)


def params_to_state_dict(params, *, prefix: str = "",
                         unprefixed: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Converts a Flax param tree back to PyTorch names and layouts (host numpy arrays).

  `prefix` goes before every key except those starting with one of `unprefixed` (transformers'
  CLIPTextModelWithProjection: `text_model.*` beside a bare `text_projection.weight`).
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
  table = key_table(abstract)
  flat = flatten_dict(params)
  return {(key if key.startswith(unprefixed) else prefix + key):
          _to_torch_array(np.asarray(jax.device_get(flat[e.path])), e) for key, e in table.items()}


# ---------------------------------------------------------------------------------------------
# Per-component adapters.

TEXT_MODEL_PREFIX = "text_model."


def text_encoder_adapt(key, w, table):
  """Accepts keys with and without transformers' `text_model.` prefix."""
  if key.startswith(TEXT_MODEL_PREFIX):
    return key[len(TEXT_MODEL_PREFIX):], w
  return None


def text_encoder_ignore(key: str) -> bool:
  """The `position_ids` buffer older transformers saved (CLIP text and vision)."""
  return key.endswith("embeddings.position_ids")


VISION_MODEL_PREFIX = "vision_model."
VISUAL_PROJECTION = "visual_projection."


def image_encoder_adapt(key, w, table):
  """Adds `vision_model.` to the tower's keys when missing (transformers 5's CLIPVisionModel)."""
  if key.startswith((VISION_MODEL_PREFIX, VISUAL_PROJECTION)):
    return None
  return VISION_MODEL_PREFIX + key, w


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_adapt(key, w, table):
  """Old VAE attention names (query/key/value/proj_attn) and 4-D (C, C, 1, 1) attention weights."""
  m = re.match(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
  if m:
    key = f"{m[1]}{_OLD_VAE_ATTENTION[m[2]]}.{m[3]}"
  entry = table.get(key)
  if entry is not None and entry.kind == "linear" and w.ndim == 4 and w.shape[2:] == (1, 1):
    w = w[:, :, 0, 0]
  return key, w
