"""report_to: TensorBoard event files read back with tensorboard's EventAccumulator (scalars,
images, a resumed run's purge), W&B through its package's calls, and the one-line errors for a
name that is not one or a package that is missing."""

import importlib.machinery
import importlib.util
import io
import sys
import types

import numpy as np
import pytest
from PIL import Image

from persona_jax.errors import ConfigError
from persona_jax.train import loop, reporting
from tests.runs import ti_config


def _grid(path, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


def test_tensorboard_holds_scalars_and_sample_grids_and_a_resume_hides_the_lost_steps(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  grid = _grid(tmp_path / "grid.png")
  reporters = reporting.open_reporters("tensorboard", tmp_path / "run", config={}, start=0)
  for step in (1, 2, 3):
    reporters.scalars(step, {"step": step, "loss": 1.0 / step, "lr": 1e-4 * step})
  reporters.image(2, "samples", tmp_path / "grid.png")
  reporters.close()
  # Killed after its step-2 checkpoint (step 3 logged, then lost): the resumed run logs 3 again.
  resumed = reporting.open_reporters("tensorboard", tmp_path / "run", config={}, start=2)
  resumed.scalars(3, {"loss": 0.25, "lr": 5e-4})
  resumed.close()

  events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0})
  events.Reload()
  assert {"loss", "lr"} <= set(events.Tags()["scalars"]) and "step" not in events.Tags()["scalars"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert [(e.step, e.value) for e in events.Scalars("lr")] == [
      (1, np.float32(1e-4)), (2, np.float32(2e-4)), (3, np.float32(5e-4))]
  (image,) = events.Images("samples")
  assert (image.step, image.width, image.height) == (2, 40, 24)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid)


def test_unknown_or_missing_reporter_is_a_one_line_error_before_the_model_loads(tmp_path,
                                                                                monkeypatch):
  with pytest.raises(ConfigError, match=r"report_to: 'tensorbord' is not one of tensorboard, wandb"):
    reporting.names("tensorbord")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("tensorboardX", "wandb") else real(name, *a))
  for name, install in (("tensorboard", r"pip install 'persona-jax\[tensorboard\]'"),
                        ("wandb", "pip install wandb")):
    # The model folder does not exist: the error comes first.
    config = ti_config(tmp_path / "no_model", report_to=f"{name}")
    with pytest.raises(ConfigError, match=f"report_to: {name} needs the .* not installed: {install}"):
      loop.train(config, tmp_path / name, progress=False)
  assert reporting.names("") == ()


def test_wandb_run_is_named_after_the_workdir_and_resumed_by_its_id(tmp_path, monkeypatch):
  """W&B (not a test dependency): a stand-in module records the package calls we make."""
  calls = []

  class Run:
    def log(self, values, step):
      calls.append(("log", values, step))

    def finish(self):
      calls.append(("finish",))
  wandb = types.ModuleType("wandb")
  wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
  wandb.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
  wandb.util = types.SimpleNamespace(generate_id=lambda: "abc123")
  wandb.Image = lambda pixels: ("image", pixels.shape)
  monkeypatch.setitem(sys.modules, "wandb", wandb)
  monkeypatch.delenv("WANDB_PROJECT", raising=False)
  _grid(tmp_path / "grid.png")
  workdir = tmp_path / "my_run"
  workdir.mkdir()
  reporters = reporting.open_reporters("wandb", workdir, config={"steps": 4}, start=0)
  reporters.scalars(1, {"step": 1, "loss": 0.5})
  reporters.image(4, "samples", tmp_path / "grid.png")
  reporters.close()
  wandb.util.generate_id = lambda: "another"
  reporting.open_reporters("wandb", workdir, config={"steps": 4}, start=2).close()
  inits = [c[1] for c in calls if c[0] == "init"]
  assert inits[0] == dict(project="persona-jax", name="my_run", id="abc123", resume="allow",
                          dir=str(workdir), config={"steps": 4})
  assert inits[1]["id"] == "abc123"           # the resumed run logs to the same W&B run
  assert [c for c in calls if c[0] != "init"] == [
      ("log", {"loss": 0.5}, 1), ("log", {"samples": ("image", (24, 40, 3))}, 4), ("finish",),
      ("finish",)]
