"""A method's result file: its trained leaves by param path (float32) in WORKDIR/<name>.safetensors,
with string metadata (a format tag, the base model, the run's method options, ...) that sampling
and export read back. Custom Diffusion, E4T, InstantBooth and FastComposer keep theirs here; the
`Result` read back is what most methods' `load` returns (methods/spec.py; Custom Diffusion's
splits out its token rows and concepts).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from persona_jax import tree
from persona_jax.errors import ModelFileError


RECORD = "result.json"             # WORKDIR/result.json: the step the result was written at


def run_metadata(context, fmt: str, **more: str) -> dict[str, str]:
  """The metadata every result records: format, base model, resolution, the method options and
  the step it was written at. `context`: the run's `methods.base.ResultContext`."""
  step = {} if context.step is None else {"step": str(context.step)}
  return {"format": fmt, "base_model": str(context.model_dir),
          "resolution": str(context.config.data.resolution),
          "method": json.dumps(dict(context.config.method_options), default=str, sort_keys=True),
          **step, **more}


def write_record(workdir, step: int, files) -> None:
  """WORKDIR/result.json: {"step": the step the result files were written at, "files"}."""
  from persona_jax.convert.files import write_json
  write_json(Path(workdir) / RECORD, {"step": int(step), "files": [str(f) for f in files]})


def recorded_step(workdir) -> int | None:
  """The step of WORKDIR's result (None: no record, a run from before the record existed)."""
  path = Path(workdir) / RECORD
  if not path.is_file():
    return None
  try:
    return int(json.loads(path.read_text())["step"])
  except (ValueError, KeyError, TypeError):
    raise ModelFileError(f"{path}: damaged (no step); run the same `train` command again to "
                         "rewrite it") from None


def check_current(workdir) -> None:
  """Refuses a result older than the run's newest checkpoint (an extended run that has not
  finished), with the fix."""
  step = recorded_step(workdir)
  from persona_jax.train.checkpoint import finished_steps
  steps = finished_steps(workdir)
  if step is not None and steps and max(steps) > step:
    raise ModelFileError(f"{workdir}: its result is from step {step}, but the run has gone on to "
                         f"a checkpoint at step {max(steps)} and has not finished: run the same "
                         "`train` command again to finish it (or train it back to its earlier "
                         "steps in a new workdir)")


def write(workdir, file_name: str, trainable, metadata: dict[str, str]) -> list[str]:
  """Writes WORKDIR/file_name (float32 leaves by path); returns [its path] (a method's save)."""
  from persona_jax.convert.files import write_safetensors
  flat = {p: np.asarray(v, np.float32) for p, v in tree.flatten(trainable).items()}
  path = Path(workdir) / file_name
  write_safetensors(path, flat, metadata)
  return [str(path)]


def metadata(path) -> dict[str, str]:
  """The safetensors metadata of a file ({} for other files)."""
  path = Path(path)
  if path.suffix != ".safetensors" or not path.is_file():
    return {}
  from safetensors import safe_open
  try:
    with safe_open(str(path), "np") as f:
      return dict(f.metadata() or {})
  except Exception as e:  # a truncated or garbled file: safetensors' own error types
    raise ModelFileError(f"{path}: cannot read safetensors file ({e})") from None


def check_fits(result_path, base_model, flat: dict, leaves) -> None:
  """Each leaf a result puts in place of a base leaf ({param path: array}) is in `flat` (the
  flat tree it samples on) at its shape; else a one-line error naming the base it trained on."""
  for path, value in leaves.items():
    have = flat.get(path)
    if have is None or tuple(have.shape) != tuple(value.shape):
      raise ModelFileError(f"{result_path}: {path} {list(value.shape)} does not fit this model "
                           f"({'missing' if have is None else list(have.shape)}); it was "
                           f"trained on {base_model}")


@dataclasses.dataclass
class Result:
  """A result read back: its path, its tensors (param path -> float32 array, or the file's own
  keys), its metadata.

  `config` rebuilds the run's method options as `config_cls`, with the image encoder it used
  (when it recorded one) and `fixed` overriding the recorded values."""
  path: Path
  weights: dict
  meta: dict
  config_cls: type | None = None
  fixed: dict = dataclasses.field(default_factory=dict)

  @property
  def config(self):
    names = {f.name for f in dataclasses.fields(self.config_cls)}
    values = {k: v for k, v in json.loads(self.meta.get("method", "{}")).items() if k in names}
    if "image_encoder" in names and "image_encoder" in self.meta:
      values["image_encoder"] = self.meta["image_encoder"]
    return self.config_cls(**{**values, **self.fixed})


def read(path, file_name: str, fmt: str, what: str, made_by: str, config_cls=None,
         **fixed) -> Result:
  """Reads WORKDIR/file_name (or the file itself), checking its format tag.

  what: the method's name in messages ("E4T"); made_by: the run that writes it ("an e4t run")."""
  from persona_jax.convert.files import read_adapter
  path = Path(path)
  if path.is_dir():
    path = path / file_name
  if not path.is_file():
    raise ModelFileError(f"{path}: no {what} result here (expected {file_name} written by {made_by})")
  meta = metadata(path)
  if meta.get("format") != fmt:
    raise ModelFileError(f"{path}: not a persona_jax {what} result (metadata format "
                         f"{meta.get('format')!r}, expected {fmt!r})")
  return Result(path, read_adapter(path), meta, config_cls, fixed)
