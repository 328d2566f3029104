"""Checkpoints of a run (orbax): the TrainState, the data iterator's state and a small JSON of
metadata (the base model's path and fingerprint, the resolved config). The frozen base is never
saved: a resume reloads it and refuses a base whose fingerprint changed.

Layout: WORKDIR/checkpoints/STEP/{state, data, meta}; an interrupted save leaves no finished
step folder. A finished one damaged later (a truncated or bit-flipped file, a deleted one) is
found at resume: `restore_latest` names the bad file, moves that step to WORKDIR/damaged/STEP and
falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from persona_jax.distributed import sync
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


def finished_steps(workdir) -> list[int]:
  """The steps of WORKDIR/checkpoints/STEP folders, ascending (orbax's unfinished temporaries,
  named STEP.orbax-checkpoint-tmp-*, are not steps)."""
  folder = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())


def make_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta)))


class DamagedCheckpoint(PersonaError):
  """No checkpoint of the workdir can be restored."""


def _damage(manager: ocp.CheckpointManager, step: int, item: str, error: Exception) -> str:
  """'checkpoints/STEP/<file>: <first line of the error>': the file the error names, or the item."""
  folder = Path(manager.directory) / str(step)
  text = " ".join(str(error).split())
  named = [m for m in re.findall(r"[\w./-]+", text) if str(folder) in m]
  where = Path(named[0]) if named else folder / item
  where = where if where.is_absolute() else folder / item
  reason = text[:160] + ("..." if len(text) > 160 else "") or type(error).__name__
  return f"{where}: {type(error).__name__}: {reason}"


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator,
                   fingerprint: str, workdir: Path):
  """(state, step) of the newest checkpoint that restores, or None without checkpoints. A
  damaged newer one is moved to WORKDIR/damaged/STEP with a warning naming its bad file and the
  step resumed from; none intact: DamagedCheckpoint, one line. A changed base still stops."""
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    for item in ("meta", "state", "data"):
      try:
        if item == "meta":
          meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
          _check_base(manager, step, meta, fingerprint)
        elif item == "state":
          if not (Path(manager.directory) / str(step) / "state" / "_METADATA").is_file():
            raise FileNotFoundError(f"{Path(manager.directory) / str(step) / 'state' / '_METADATA'} "
                                    "is missing")
          state = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state)))["state"]
        else:
          restore_data(manager, step, data_iterator)
      except PersonaError:
        raise
      except Exception as e:  # orbax/tensorstore/grain errors of a damaged file
        damaged.append((step, _damage(manager, step, item, e)))
        break
    else:
      if damaged:
        move_aside(manager, [s for s, _ in damaged], Path(workdir) / "damaged")
        log.warning("checkpoint %s; resuming from step %d, the newest intact checkpoint (the "
                    "damaged ones moved to %s)", "; ".join(f"step {s} is damaged ({why})"
                                                       for s, why in damaged),
                    step, workdir / "damaged")
      return state, step
  if damaged:
    raise DamagedCheckpoint(f"no intact checkpoint in {manager.directory}: "
                            + "; ".join(f"step {s}: {why}" for s, why in damaged)
                            + f". Move {manager.directory} aside to start the run again")
  return None


def restore_data(manager: ocp.CheckpointManager, step: int, data_iterator) -> None:
  """Restores the data iterator's position from checkpoint `step`: this process's file
  (grain writes process_I-of-N.json per process). A run resumed on another process count reads
  process 0's: every process's iterator is at the same global batch index."""
  folder = Path(manager.directory) / str(step) / "data"
  own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  others = sorted(folder.glob("process_0-of-*.json"))
  if not own.is_file() and others:
    log.info("%s: written by %s process(es); resuming the data position from %s on %d",
             folder, others[0].stem.rsplit("-", 1)[1], others[0].name, jax.process_count())
    data_iterator.set_state(json.loads(others[0].read_text()))
    return
  manager.restore(step, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(data_iterator)))


def move_aside(manager: ocp.CheckpointManager, steps, folder: Path) -> None:
  """Moves checkpoint steps out of the manager's folder into `folder`/STEP (WORKDIR/damaged,
  WORKDIR/diverged), so a resume starts from an earlier one; on the first process of a
  multi-host run, the others waiting for it."""
  if jax.process_index() == 0:
    for s in steps:
      target = Path(folder) / str(s)
      target.parent.mkdir(exist_ok=True)
      shutil.rmtree(target, ignore_errors=True)
      (Path(manager.directory) / str(s)).rename(target)
  sync("checkpoints moved aside")
  manager.reload()


def _check_base(manager, step: int, meta: dict, fingerprint: str) -> None:
  if meta.get("base_fingerprint") != fingerprint:
    raise PersonaError(
        f"{manager.directory}/{step}: this run was trained on base model {meta.get('base_path')} "
        f"(fingerprint {meta.get('base_fingerprint')}), but the model now given has fingerprint "
        f"{fingerprint}. Resume with the same base, or start a new workdir.")


def abstract_of(tree_, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree_, shardings)


def write_json_atomic(path: Path, obj) -> None:
  from persona_jax.convert.files import write_json
  write_json(path, obj)


def read_json(path: Path):
  return json.loads(Path(path).read_text())
