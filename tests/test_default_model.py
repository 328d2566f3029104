"""The embedded default's cache copy follows every shipped file, configs included; the shipped
scheduler configs say what toy_model writes (steps_offset 1, as diffusers expects)."""

import dataclasses
import json
import shutil

import numpy as np

from persona_jax import default_model
from persona_jax.diffusion.samplers import SAMPLERS, make_sampler
from persona_jax.diffusion.schedules import SchedulerConfig
from persona_jax.world import toy_model


def test_a_changed_config_file_is_a_new_cache_copy(tmp_path, monkeypatch):
  """Same weights, another scheduler config: a new cache folder with the new config; the old
  copy stays as it was (runs that trained on it still resume from it)."""
  shipped = tmp_path / "toy_base"
  shutil.copytree(default_model.shipped_base_dir(), shipped)
  monkeypatch.setattr(default_model, "shipped_base_dir", lambda: shipped)
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  first = default_model.default_model_dir()
  assert first.name.startswith(default_model.TOY_BASE_PREFIX
                               + (shipped / default_model.VERSION_FILE).read_text().strip() + "-")
  config = shipped / "scheduler" / "scheduler_config.json"
  raw = json.loads(config.read_text())
  config.write_text(json.dumps(dict(raw, steps_offset=raw["steps_offset"] + 1)))
  second = default_model.default_model_dir()
  assert second != first and second.parent == first.parent
  cached = json.loads((second / "scheduler" / "scheduler_config.json").read_text())
  assert cached["steps_offset"] == raw["steps_offset"] + 1
  assert json.loads((first / "scheduler" / "scheduler_config.json").read_text()) == raw
  assert default_model.default_model_dir() == second          # reused while nothing changes


def test_the_shipped_scheduler_configs_are_the_recipe_s():
  """A rebuild keeps them: toy_model's configs (toy_xl copies the base's) say steps_offset 1,
  which our trailing-spacing samplers never read and diffusers' pipelines no longer warn about."""
  recipe = toy_model.toy_configs()["scheduler"]
  assert recipe["steps_offset"] == 1 and recipe["timestep_spacing"] == "trailing"
  for shipped in (default_model.shipped_base_dir(), default_model.shipped_xl_dir()):
    raw = json.loads((shipped / "scheduler" / "scheduler_config.json").read_text())
    assert raw == recipe, shipped
  config = SchedulerConfig.from_dict(recipe)
  before = dataclasses.replace(config, steps_offset=0)       # what the base shipped with
  for name in SAMPLERS:
    for steps in (1, 7, 25, 50, 61, 1000):
      new, old = make_sampler(name, config, steps).arrays(), make_sampler(name, before, steps).arrays()
      assert new.keys() == old.keys()
      for key in new:
        np.testing.assert_array_equal(new[key], old[key], err_msg=f"{name} {steps} {key}")
