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
    # the toy SD base, or the toy SDXL one for SDXL-only methods (photomaker), or the toy
    # BLIP-Diffusion folder written from the toy SD base (blip_diffusion)
    from persona_jax.world.toy_blip_diffusion import toy_blip_diffusion_dir
    assert config.model in ("default", "toy-xl", str(toy_blip_diffusion_dir()))
    assert config.data.instance_dir == ""


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


def test_train_help_lists_the_configs_and_flags(capsys):
  assert main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: persona-jax train --config NAME")
  for name in CONFIGS:                       # each with its variants and its docstring's first line
    line = next(l for l in out.splitlines() if l.strip().startswith(name + " ") or
                l.strip().startswith(name + " ["))
    summary = load(name).__doc__.strip().splitlines()[0]
    assert summary in line, (name, line)
  assert "dreambooth [:tiny]" in out and "lora [:tiny|:kohya|:blocks=PRESET]" in out
  for flag in ("--config NAME", "--workdir DIR", "--noprogress", "--print-config"):
    assert flag in out


def test_print_config_prints_the_resolved_config(capsys):
  import json
  assert main(["train", "--config", "lora:tiny", "--config.method.rank=8",
               "--config.optim.lr_groups=((\"text_encoder/.*\", 1e-5),)", "--print-config"]) == 0
  printed = json.loads(capsys.readouterr().out)
  expected = run_config(load("lora").get_config("tiny")).to_dict()
  assert printed == expected | {"method": {**expected["method"], "rank": 8},
                                "optim": {**expected["optim"], "lr_groups": [["text_encoder/.*", 1e-5]]}}
  assert printed["method"]["rank"] == 8 and printed["optim"]["b2"] == 0.999


def test_configs_of_earlier_versions_upgrade_to_the_same_optimizer_groups():
  """config.json files written before the method lifecycle: the method's learning rates become
  optim.lr_groups in the order its optimizer had them (so a resumed optimizer state keeps its
  structure), old multipliers become learning rates, the prior weight moves to the top level."""
  from persona_jax.methods.instantbooth import ADAPTER_LEAVES, ENCODER_LEAVES
  from persona_jax.train.config import upgrade
  ib = upgrade({"method": {"name": "instantbooth", "encoder_lr": 1e-3, "adapter_lr": 1e-4,
                           "patch_tokens": True}, "optim": {"lr": 1e-3}})
  assert ib["optim"]["lr_groups"] == [[ENCODER_LEAVES, 1e-3], [ADAPTER_LEAVES, 1e-4]]
  assert "encoder_lr" not in ib["method"] and "adapter_lr" not in ib["method"]
  ib = upgrade({"method": {"name": "instantbooth", "encoder_lr": 1e-4, "adapter_lr": 1e-6,
                           "patch_tokens": False}, "optim": {"lr": 1e-4}})
  assert ib["optim"]["lr_groups"] == [[ENCODER_LEAVES, 1e-4]]
  db = upgrade({"method": {"name": "dreambooth", "train_text_encoder": True,
                           "text_encoder_lr": 1e-6, "prior_loss_weight": 0.5},
                "optim": {"lr": 2e-6, "groups": [["unet/up.*", 0.5]]}})
  assert db["optim"]["lr_groups"] == [["text_encoder/.*", 1e-6], ["unet/up.*", 1e-6]]
  assert db["prior_loss_weight"] == 0.5 and "groups" not in db["optim"]
  assert run_config(db).optim.lr_groups == (("text_encoder/.*", 1e-6), ("unet/up.*", 1e-6))
  cd = upgrade({"method": {"name": "custom_diffusion", "prior_loss_weight": 1.0}})
  assert cd["optim"]["scale_lr_class_rows"] is True and cd["prior_loss_weight"] == 1.0
  lora = {"method": {"name": "lora", "rank": 4}, "optim": {"lr": 1e-4}}
  assert upgrade(lora) == lora


def assignments(name):
  """The dotted paths a config file assigns (`c.a.b = ...`)."""
  import ast
  source = (importlib.resources.files("persona_jax.configs") / f"{name}.py").read_text()
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      parts, target = [], node.targets[0]
      while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
      if getattr(target, "id", "") == "c":
        out.append(".".join(reversed(parts)))
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_a_config_states_only_what_differs_from_the_base(name):
  """Every field a config file sets differs from the base (`train.config.base_config`: the
  RunConfig and method defaults) in at least one of its variants."""
  from persona_jax import tree
  from persona_jax.train.config import base_config
  module = load(name)
  variants = [None] + [v.replace("PRESET", "MIDD") for v in module.VARIANTS]
  configs = {v: module.get_config(v).to_dict() for v in variants}
  base = tree.flatten(base_config(configs[None]["method"]["name"]).to_dict())
  paths = assignments(name)
  assert paths, name
  for path in paths:
    key = path.replace(".", "/")
    values = [tree.flatten(c).get(key) for c in configs.values()]
    assert any(v != base.get(key) for v in values), f"{name}: c.{path} restates the default"
