"""Where a run's metrics and sample grids go besides WORKDIR/metrics.jsonl and WORKDIR/samples/
(`report_to`): TensorBoard event files in WORKDIR (written by tensorboardX; `tensorboard --logdir
WORKDIR`, or the folder of several workdirs) and Weights & Biases (its `wandb` package, when
installed). Only the first process reports."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from persona_jax.errors import ConfigError

# name -> (module it needs, how to install it)
REPORTERS = {"tensorboard": ("tensorboardX", "pip install 'persona-jax[tensorboard]'"),
             "wandb": ("wandb", "pip install wandb")}
WANDB_ID = "wandb_run_id.txt"       # in WORKDIR: a resumed run logs to the same W&B run


def names(report_to: str) -> tuple[str, ...]:
  """The reporters `report_to` names ("tensorboard", "wandb", or both, comma-separated); a name
  that is not one or a package that is missing: ConfigError."""
  chosen = tuple(dict.fromkeys(n.strip() for n in report_to.split(",") if n.strip()))
  for name in chosen:
    if name not in REPORTERS:
      raise ConfigError(f"report_to: '{name}' is not one of {', '.join(REPORTERS)} "
                        "(comma-separated; empty: metrics.jsonl only)")
    module, install = REPORTERS[name]
    if importlib.util.find_spec(module) is None:
      raise ConfigError(f"report_to: {name} needs the {module} package, which is not installed: "
                        f"{install}")
  return chosen


class Reporters:
  """The reporters of a run: `scalars` (a metrics record), `image` (a sample grid), `close`. With
  none (not asked for, or not the first process) every call does nothing."""

  def __init__(self, writers=()):
    self.writers = list(writers)

  def scalars(self, step: int, values: dict) -> None:
    values = {k: float(v) for k, v in values.items() if k != "step"}
    for w in self.writers:
      w.scalars(step, values)

  def image(self, step: int, tag: str, path) -> None:
    """The PNG at `path` (a sample grid) as image `tag`; None: nothing."""
    if path is None or not self.writers:
      return
    from PIL import Image
    with Image.open(path) as im:
      pixels = np.asarray(im.convert("RGB"))          # [H, W, 3] uint8
    for w in self.writers:
      w.image(step, tag, pixels)

  def close(self) -> None:
    for w in self.writers:
      w.close()
    self.writers = []


def open_reporters(report_to: str, workdir, *, config: dict, start: int) -> Reporters:
  """The reporters `report_to` names, writing for WORKDIR from step `start` (a run resumed from
  its step-`start` checkpoint: what it logged after that step is hidden in TensorBoard)."""
  writers = []
  for name in names(report_to):
    writers.append(TensorBoard(workdir, start) if name == "tensorboard"
                   else WandB(workdir, config))
  return Reporters(writers)


class TensorBoard:
  """Event files in WORKDIR (tensorboardX's SummaryWriter), flushed at every record."""

  def __init__(self, workdir, start: int):
    from tensorboardX import SummaryWriter
    # A resumed run (from its step-`start` checkpoint) hides what a killed run logged after it.
    self.writer = SummaryWriter(logdir=str(workdir), purge_step=start + 1 if start else None,
                                filename_suffix=f".{time.time_ns()}")   # unique, in order

  def scalars(self, step: int, values: dict) -> None:
    for k, v in values.items():
      self.writer.add_scalar(k, v, global_step=step)
    self.writer.flush()

  def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
    self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


class WandB:
  """A W&B run named after the workdir (project: $WANDB_PROJECT, else persona-jax), resumed by the
  id kept in WORKDIR/wandb_run_id.txt."""

  def __init__(self, workdir, config: dict):
    import wandb
    workdir = Path(workdir)
    id_file = workdir / WANDB_ID
    if id_file.is_file():
      run_id = id_file.read_text().strip()
    else:
      run_id = wandb.util.generate_id()
      tmp = id_file.with_suffix(".tmp")
      tmp.write_text(run_id + "\n")
      tmp.replace(id_file)
    self.wandb = wandb
    self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "persona-jax"),
                          name=workdir.name, id=run_id, resume="allow", dir=str(workdir),
                          config=config)

  def scalars(self, step: int, values: dict) -> None:
    self.run.log(values, step=step)

  def image(self, step: int, tag: str, pixels: np.ndarray) -> None:
    self.run.log({tag: self.wandb.Image(pixels)}, step=step)

  def close(self) -> None:
    self.run.finish()
