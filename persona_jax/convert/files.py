"""Finding, reading and writing the weight files of one component folder (numpy, no torch).

Looks for, in order: `{stem}[.{variant}].safetensors`, then the sharded
`{stem}.safetensors.index[.{variant}].json`. Pickle files (`.bin`, `.ckpt`, `.pt`, `.pth`) are
refused with a message saying how to opt in; with `allow_pickle=True` they are read by
`torch.load(weights_only=True)` (torch comes with the `verify` extra).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from persona_jax.errors import ModelFileError, PickleRefusedError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# transformers names the text encoder's files `model.*`; older folders `pytorch_model.bin`.
PICKLE_ALTERNATIVES = {"model": ("pytorch_model",)}


def add_variant(name: str, variant: str | None) -> str:
  """'model.safetensors' + 'fp16' -> 'model.fp16.safetensors' (the diffusers/transformers rule)."""
  if variant is None:
    return name
  head, ext = name.rsplit(".", 1)
  return f"{head}.{variant}.{ext}"


def find_weights(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
  """The safetensors file(s) holding a component's weights; pickle files only to refuse them."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ModelFileError(f"{folder}: component folder not found")
  single = folder / add_variant(f"{stem}.safetensors", variant)
  if single.is_file():
    return [single]
  index = folder / add_variant(f"{stem}.safetensors.index.json", variant)
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ModelFileError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    shards = [folder / s for s in sorted(set(weight_map.values()))]
    for s in shards:
      if not s.is_file():
        raise ModelFileError(f"{index}: shard {s.name} is listed but missing")
    return shards
  stems = (stem, *PICKLE_ALTERNATIVES.get(stem, ()))
  pickles = [folder / add_variant(f"{s}{suffix}", variant) for s in stems for suffix in PICKLE_SUFFIXES]
  pickles = [p for p in pickles if p.is_file()]
  if pickles:
    return pickles[:1]
  want = single.name if variant else f"{stem}.safetensors"
  hint = f" (variant '{variant}' asked for; drop --variant to use the default files)" if variant else ""
  raise ModelFileError(f"{folder}: no weights file: expected {want}{hint}")


def read_weights(folder: Path, stem: str, variant: str | None = None,
                 allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], str]:
  """Reads a component's tensors. Returns ({key: array}, a description of the source files)."""
  files = find_weights(folder, stem, variant)
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    if f.suffix in PICKLE_SUFFIXES:
      tensors.update(_read_pickle(f, allow_pickle))
    else:
      tensors.update(read_safetensors(f))
  source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{{{','.join(f.name for f in files)}}}"
  return tensors, source


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except Exception as e:  # safetensors raises its own error types for truncated/garbled files
    raise ModelFileError(f"{path}: cannot read safetensors file ({e})") from None


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
  if not allow_pickle:
    raise PickleRefusedError(
        f"{path}: refusing to load a pickle file (it can run arbitrary code). Convert it to "
        "safetensors, or, if you trust it, opt in with --allow-pickle "
        "(load_pipeline(..., allow_pickle=True)); reading it needs torch (pip install "
        "'persona-jax[verify]').")
  try:
    import torch
  except ImportError:
    raise ModelFileError(f"{path}: reading a pickle file needs torch; pip install "
                         "'persona-jax[verify]' -c constraints.txt") from None
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  while isinstance(state, Mapping) and "state_dict" in state and len(state) <= 3:
    state = state["state_dict"]
  out = {}
  for k, v in state.items():
    if isinstance(v, torch.Tensor):
      out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _publish(tmp: str, path: Path) -> None:
  """Gives a finished temporary file normal permissions and renames it into place."""
  os.chmod(tmp, 0o666 & ~_umask())
  os.replace(tmp, path)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes atomically: a temporary file in the same folder, then rename."""
  from safetensors.numpy import save_file
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = {k: np.require(v, requirements="C") for k, v in tensors.items()}   # keeps 0-d scalars
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    save_file(data, tmp, metadata=dict(metadata or {"format": "pt"}))
    _publish(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: Path, obj) -> None:
  """Writes JSON atomically, with the indentation diffusers uses."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  _publish(tmp, path)


def copy_file(src: Path, dst: Path) -> Path:
  """Copies a file atomically (a temporary name in the destination folder, then rename)."""
  import shutil
  dst = Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
  os.close(fd)
  try:
    shutil.copyfile(src, tmp)
    _publish(tmp, dst)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return dst
