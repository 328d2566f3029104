"""Checkpoints of a run (orbax): the TrainState, the data iterator's state and a small JSON of
metadata (the base model's path and fingerprint, the resolved config). The frozen base is never
saved: a resume reloads it and refuses a base whose fingerprint changed.

Layout: WORKDIR/checkpoints/STEP/{state, data, meta}; an interrupted save leaves no finished
step folder, so the last good checkpoint is always what `latest_step` returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from persona_jax.errors import PersonaError

log = logging.getLogger(__name__)


def base_fingerprint(model_dir: Path) -> str:
  """A fast content fingerprint of a diffusers folder (or a single-file checkpoint): every config, every weight file's size,
  safetensors header and 16 evenly spaced 64 KB chunks (sha256). Changes to any tensor's bytes
  that land in a sampled chunk, any shape or name, or any config change it."""
  h = hashlib.sha256()
  root = Path(model_dir)
  files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  for f in files:                      # a folder's files, or a single-file checkpoint
    rel = f.relative_to(root).as_posix() if f != root else f.name
    if rel.startswith("tokenizer/") or f.name.startswith("."):
      continue
    size = f.stat().st_size
    h.update(f"{rel}\0{size}\0".encode())
    with open(f, "rb") as fh:
      if f.suffix == ".json":
        h.update(fh.read())
        continue
      head = fh.read(8)
      h.update(head)
      if f.suffix == ".safetensors" and len(head) == 8:
        h.update(fh.read(int.from_bytes(head, "little")))
      for k in range(16):
        fh.seek(size * k // 16)
        h.update(fh.read(65536))
  return h.hexdigest()[:16]


def make_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator,
            fingerprint: str):
  """Restores state (onto the shardings of `abstract_state`) and the iterator, checking the base."""
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta.get("base_fingerprint") != fingerprint:
    raise PersonaError(
        f"{manager.directory}/{step}: this run was trained on base model {meta.get('base_path')} "
        f"(fingerprint {meta.get('base_fingerprint')}), but the model now given has fingerprint "
        f"{fingerprint}. Resume with the same base, or start a new workdir.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored["state"], meta


def abstract_of(tree_, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree_, shardings)


def write_json_atomic(path: Path, obj) -> None:
  from persona_jax.convert.files import write_json
  write_json(path, obj)


def read_json(path: Path):
  return json.loads(Path(path).read_text())
