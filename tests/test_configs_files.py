"""Every shipped config builds, in every variant, into a typed run config; its tiny variant runs
end to end through the train command (2 steps) and writes the method's file."""

import importlib.resources
import importlib.util

import jax
import pytest
from safetensors.numpy import load_file

from persona_jax.cli import main
from persona_jax.train.config import run_config
from tests.markers import slow

CONFIGS = sorted(p.name[:-3] for p in importlib.resources.files("persona_jax.configs").iterdir()
                 if p.name.endswith(".py") and not p.name.startswith("_"))


def load(name):
  path = importlib.resources.files("persona_jax.configs") / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "tiny"])
def test_config_builds(name, variant):
  config = run_config(load(name).get_config(variant))
  assert config.method_name
  if variant == "tiny":
    assert config.model == "default" and config.data.instance_dir == ""


def test_textual_inversion_tiny_runs_through_the_cli(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  wd = tmp_path / "ti"
  assert main(["train", "--config", "textual_inversion:tiny", "--workdir", str(wd),
               "--config.steps=2", "--config.sample_steps=2", "--config.batch_size=8",
               "--noprogress"]) == 0   # batch 8: data parallel over the 8 test devices
  out = capsys.readouterr().out.split()
  assert out == [str(wd / "learned_embeds.safetensors"), str(wd / "samples" / "step_000002.png")]
  import json

  from persona_jax.default_model import default_model_dir
  width = json.loads((default_model_dir() / "text_encoder" / "config.json").read_text())["hidden_size"]
  assert load_file(out[0])["<my-toy>"].shape == (1, width)


@slow
def test_dreambooth_tiny_runs_through_the_cli(tmp_path, monkeypatch, capsys):
  """Class images are sampled into WORKDIR/class_images, then 2 steps of 4 instance + 4 class
  rows over the 8 test devices; the result is a diffusers folder. (Slow-only: DreamBooth, class
  images, the CLI and the folder's loading in diffusers each have cheaper tests.)"""
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  wd = tmp_path / "db"
  assert main(["train", "--config", "dreambooth:tiny", "--workdir", str(wd), "--config.steps=2",
               "--config.sample_steps=2", "--config.batch_size=4", "--config.data.num_class_images=4",
               "--config.data.class_sample_steps=2", "--noprogress"]) == 0
  out = capsys.readouterr().out.split()
  assert out == [str(wd / "model"), str(wd / "samples" / "step_000002.png")]
  assert sorted(p.name for p in (wd / "class_images").glob("*.png")) == [
      f"class-{i:05d}.png" for i in range(4)]
  # The result loads in diffusers with the trained UNet and the base's other components.
  import numpy as np
  from diffusers import UNet2DConditionModel

  from persona_jax.default_model import default_model_dir
  from persona_jax.pipeline import load_pipeline
  ours, base = load_pipeline(wd / "model"), load_pipeline(default_model_dir())
  kernel = np.asarray(ours.params["unet"]["conv_in"]["kernel"])
  assert not np.array_equal(kernel, base.params["unet"]["conv_in"]["kernel"])
  for a, b in zip(jax.tree.leaves(ours.params["vae"]), jax.tree.leaves(base.params["vae"])):
    assert np.array_equal(a, b)
  for a, b in zip(jax.tree.leaves(ours.params["text_encoder"]), jax.tree.leaves(base.params["text_encoder"])):
    assert np.array_equal(a, b)
  unet = UNet2DConditionModel.from_pretrained(wd / "model" / "unet")
  np.testing.assert_array_equal(unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0), kernel)


def test_train_help_names_its_flags(capsys):
  assert main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: persona-jax train --config NAME")
  for flag in ("--config:", "--workdir:", "--[no]progress:"):
    assert flag in out
