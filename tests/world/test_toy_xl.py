"""The toy SDXL base: grown from an SD 1.x base without changing what its UNet computes, its
text encoder distilled, pre-trained resumably; the shipped `toy-xl` loads, verifies and samples."""

import numpy as np
import pytest

from persona_jax import tree
from tests.markers import slow
from persona_jax.world import identities, toy_xl


@pytest.fixture(scope="module")
def grown(model_dirs):
  import jax

  from persona_jax.convert.diffusers_folder import parse_configs
  from persona_jax.pipeline import load_pipeline
  sd1 = load_pipeline(model_dirs["sd1"])
  raw = toy_xl.xl_configs(sd1.raw_configs)
  configs = parse_configs(raw)
  params = toy_xl.grown_params(jax.tree.map(np.asarray, sd1.params), configs)
  return sd1, raw, configs, params


def test_the_grown_unet_computes_the_sd1_unet_whatever_the_new_inputs(grown):
  from persona_jax.models.unet import UNet2DConditionModel
  sd1, raw, configs, params = grown
  c = configs["unet_config"]
  assert c.addition_embed_type == "text_time" and raw["model_index"]["force_zeros_for_empty_prompt"] is False
  assert "DownBlock2D" in c.down_block_types                        # a level without attention
  assert c.cross_attention_dim == sd1.unet_config.cross_attention_dim + toy_xl.TEXT_ENCODER_2["hidden_size"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, c.in_channels)).astype(np.float32)
  t = np.asarray([3, 900])
  context = rng.standard_normal((2, 77, sd1.unet_config.cross_attention_dim)).astype(np.float32)
  want = sd1.models().unet.apply({"params": sd1.params["unet"]}, x, t, context)
  extra = rng.standard_normal((2, 77, 32)).astype(np.float32)           # the second encoder's part
  added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
           "time_ids": rng.uniform(0, 64, (2, 6)).astype(np.float32)}
  got = UNet2DConditionModel(c).apply({"params": params["unet"]}, x, t,
                                      np.concatenate([context, extra], -1), added_cond=added)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Every other weight is the SD 1.x base's; only the new conditioning is fresh.
  old, new = tree.flatten(sd1.params["unet"]), tree.flatten(params["unet"])
  assert {p for p in new if p not in old} == {p for p in new if p.startswith("add_embedding")}


def test_the_grown_text_encoder_keeps_the_sd1_layers_and_distills_toward_its_output(grown):
  from persona_jax.models.text_encoder import CLIPTextModel
  from persona_jax.tokenizer import load_tokenizer, tokenize
  sd1, raw, configs, params = grown
  te1 = CLIPTextModel(configs["text_encoder_config"])
  old = CLIPTextModel(sd1.text_encoder_config)
  ids = tokenize(load_tokenizer(sd1.tokenizer_dir), ["a photo of a red ball", "", "a blue star"])
  ours = te1.apply({"params": params["text_encoder"]}, ids)
  theirs = old.apply({"params": sd1.params["text_encoder"]}, ids)
  # The appended layer starts as the identity; the layers below are the SD 1.x ones.
  np.testing.assert_allclose(ours.hidden_states[-1], ours.hidden_states[-2], atol=1e-6)
  np.testing.assert_allclose(ours.hidden_states[-2], theirs.hidden_states[-1], atol=1e-5)
  many = np.concatenate([ids] * 8)
  _, before, after = toy_xl.distill_text_encoder(te1, params["text_encoder"], old,
                                                 sd1.params["text_encoder"], many, steps=15,
                                                 batch_size=8)
  assert after < 0.7 * before


def test_the_world_mixes_in_identity_scenes():
  text, paint = toy_xl.world_xl_scene(0, 6)
  image, cover = paint()
  scene = identities.identity_scene(0, "train", 6)
  np.testing.assert_array_equal(image, identities.render(scene))
  np.testing.assert_allclose(cover, identities.masks(scene)[0])
  pair_text, paint = toy_xl.world_xl_scene(0, 15)
  pair_image, pair_cover = paint()
  assert pair_text.startswith("a photo of a") and " and a " in pair_text
  assert " and a " in identities.caption(identities.pair_scene(0, "train", 15))
  assert pair_cover.max() <= 1.0 and pair_image.shape == (32, 32, 3)
  from persona_jax.world import toy_model
  np.testing.assert_array_equal(toy_xl.world_xl_scene(0, 3)[1]()[0], toy_model.world_scene(0, 3)[1]()[0])
  assert text == identities.caption(scene, np.random.default_rng([0, 6, 7]))


def test_the_shipped_toy_xl_loads_verifies_and_draws_what_it_is_asked(tmp_path, monkeypatch, capsys):
  """`--model toy-xl`: written to the cache on first use with both tokenizers, equal to diffusers'
  StableDiffusionXLPipeline (verify), and its samples show the asked colour and background."""
  from persona_jax.cli import main
  from persona_jax.default_model import TOY_XL_PREFIX, resolve_model, shipped_xl_dir
  from persona_jax.pipeline import load_pipeline
  from persona_jax.text_to_image import SampleOptions, text_to_image
  from persona_jax.world import metric_encoder
  from persona_jax.world.prompt_following import score
  from tests.torch_reference import require_torch
  require_torch()
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  size = sum(f.stat().st_size for f in shipped_xl_dir().rglob("*") if f.is_file())
  assert size < 30e6
  folder = resolve_model("toy-xl")
  assert folder.name.startswith(TOY_XL_PREFIX) and (folder / "tokenizer_2" / "vocab.json").is_file()
  pipe = load_pipeline(folder)
  assert pipe.is_sdxl and pipe.tokenizer_2.pad_token == "!" and not pipe.force_zeros_for_empty_prompt
  assert main(["verify", "toy-xl"]) == 0
  out = capsys.readouterr().out
  assert "unet (added conditioning)" in out and out.rstrip().endswith("PASS")
  prompts = ["a photo of a red ball on a blue background", "a photo of a yellow box on a black background",
             "a photo of a green heart on a white background", "a photo of a purple star on a yellow background"]
  images = text_to_image(pipe, prompts, "", 1, SampleOptions(steps=15, guidance=4.0, seed=0, height=32,
                                                           width=32, batch_size=4), progress=False)
  asked = [{"class": p.split()[5], "colour": p.split()[4], "pattern": "plain", "pattern_colour": "none",
            "background": p.split()[-2]} for p in prompts]
  result = score(metric_encoder.load(), images, asked)
  assert result["colour"] >= 0.75 and result["background"] >= 0.75, result


@slow
def test_xl_pretraining_resumed_equals_uninterrupted(model_dirs, tmp_path):
  from persona_jax.pipeline import load_pipeline
  t = toy_xl.XLTraining(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=1)
  kwargs = dict(num_images=8, start_from=model_dirs["sd1"], distill_steps=2, progress=False)
  assert toy_xl.pretrain_xl(tmp_path / "a", t, until=2, **kwargs) is None
  resumed = toy_xl.pretrain_xl(tmp_path / "a", t, **kwargs)
  whole = toy_xl.pretrain_xl(tmp_path / "b", t, **kwargs)
  a, b = tree.flatten(load_pipeline(resumed).params), tree.flatten(load_pipeline(whole).params)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  steps = [r["step"] for r in map(__import__("json").loads,
                                  (tmp_path / "a" / "unet" / "metrics.jsonl").read_text().splitlines())]
  assert steps == [2, 3]
  assert load_pipeline(resumed).is_sdxl
