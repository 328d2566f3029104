"""Building the toy-world base: the scene folder, the VAE trainer (resumable), the initial
pipeline's configs."""

import json

import numpy as np
from PIL import Image

from persona_jax.models.configs import VAEConfig
from persona_jax.world import scenes
from persona_jax.world import toy_model as tm


def test_world_folder_is_the_scene_stream_and_resumes(tmp_path):
  folder = tm.write_world(tmp_path / "world", 5, seed=2, progress=False)
  rows = [json.loads(l) for l in (folder / "metadata.jsonl").read_text().splitlines()]
  assert [r["file_name"] for r in rows] == [f"{k:06d}.png" for k in range(5)]
  first = np.asarray(Image.open(folder / "000003.png"))
  np.testing.assert_array_equal(first, scenes.render(scenes.sample_scene(2, "train", 3)))
  assert scenes.sample_scene(2, "train", 3).cls in rows[3]["text"]
  # The object's coverage is each scene's subject mask (the UNet stage's loss weights).
  coverage = scenes.coverage(scenes.sample_scene(2, "train", 3))
  np.testing.assert_allclose(np.asarray(Image.open(folder / "000003.mask.png")) / 255, coverage,
                             atol=0.5 / 255)
  assert coverage.max() == 1.0 and coverage.min() == 0.0
  # An interrupted folder (no metadata yet, one image missing) completes to the same bytes.
  (folder / "metadata.jsonl").unlink()
  (folder / "000003.png").unlink()
  (folder / "000004.mask.png").unlink()
  tm.write_world(folder, 5, seed=2, progress=False)
  np.testing.assert_array_equal(np.asarray(Image.open(folder / "000003.png")), first)
  assert (folder / "000004.mask.png").is_file()
  assert [json.loads(l) for l in (folder / "metadata.jsonl").read_text().splitlines()] == rows


def test_vae_training_logs_checkpoints_and_resumes(tmp_path):
  config = VAEConfig.from_dict(dict(tm.toy_configs()["vae"], block_out_channels=[8, 8],
                                    down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4))
  t = tm.VAETraining(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=3)
  tm.train_vae(tmp_path, config, t, progress=False)
  tm.train_vae(tmp_path, config, tm.VAETraining(steps=4, batch_size=2, warmup_steps=1,
                                                checkpoint_every=3), progress=False)
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [3, 4]                 # the second call ran step 4 only
  assert all(np.isfinite(r["loss"]) and r["mse"] > 0 for r in logged)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]


def test_vae_loss_weights_the_objects_pixels():
  import jax
  import jax.numpy as jnp

  from persona_jax.models.vae import AutoencoderKL
  from persona_jax.models.components import init_params
  config = VAEConfig.from_dict(dict(tm.toy_configs()["vae"], block_out_channels=[8, 8],
                                    down_block_types=["DownEncoderBlock2D"] * 2,
                                    up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4))
  vae, params = AutoencoderKL(config), init_params("vae", config, jax.random.PRNGKey(0))
  images, weights = tm.world_images(0, 0, 2, object_weight=4.0)
  assert weights.shape == (2, 32, 32) and weights.min() == 1.0 and weights.max() == 5.0
  rng = jax.random.PRNGKey(1)
  _, plain = tm.vae_loss(vae, params, images, np.ones_like(weights), rng, 0.0)
  _, weighted = tm.vae_loss(vae, params, images, weights, rng, 0.0)
  np.testing.assert_allclose(plain["weighted_mse"], plain["mse"], rtol=1e-6)
  assert weighted["mse"] == plain["mse"] and weighted["weighted_mse"] != plain["weighted_mse"]
  # By hand: the weighted mean of the per-pixel squared error.
  moments = vae.apply({"params": params}, jnp.asarray(images), method="encode")
  recon = vae.apply({"params": params}, moments.sample(rng), method="decode")
  err = np.mean(np.square(np.asarray(recon) - images), -1)
  np.testing.assert_allclose(weighted["weighted_mse"], np.sum(err * weights) / np.sum(weights), rtol=1e-5)


def test_pretraining_can_start_from_an_earlier_model(model_dirs, tmp_path):
  """--start-from: the model's weights (float32) become the init stage; no VAE is trained."""
  from persona_jax.pipeline import load_pipeline
  from persona_jax.tree import flatten
  init = tm.build_base(tmp_path / "a", num_images=2, start_from=model_dirs["sd1"], progress=False)
  assert not (tmp_path / "a" / "vae").exists()
  source, started = (flatten(load_pipeline(d).params) for d in (model_dirs["sd1"], init))
  assert source.keys() == started.keys()
  for path, value in started.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, np.asarray(source[path], np.float32))
  # A shipped model (float16, no tokenizer files) works as well.
  shipped = tm.ship(model_dirs["sd1"], tmp_path / "shipped")
  init = tm.build_base(tmp_path / "b", num_images=2, start_from=shipped, progress=False)
  for path, value in flatten(load_pipeline(init).params).items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, np.asarray(source[path], np.float16).astype(np.float32))


def test_pretraining_can_deepen_the_model_it_starts_from(model_dirs, tmp_path, capsys):
  """make-toy-model --grow-layers: the init stage is the deepened UNet (per-block layers_per_block); the text
  encoder and VAE are the model's own. Without --start-from it is refused before any work."""
  from persona_jax.cli import main
  from persona_jax.pipeline import load_pipeline
  from persona_jax.tree import flatten
  assert main(["make-toy-model", "--workdir", str(tmp_path / "a"), "--images", "2",
               "--start-from", str(model_dirs["sd1"]), "--grow-layers", "3,2",
               "--stop-after-init"]) == 0
  init = tmp_path / "a" / "init"
  source, grown = load_pipeline(model_dirs["sd1"]), load_pipeline(init)
  assert json.loads((init / "unet" / "config.json").read_text())["layers_per_block"] == [3, 2]
  assert grown.unet_config.layers_per_block_list == (3, 2)
  old, new = flatten(source.params["unet"]), flatten(grown.params["unet"])
  assert set(old) < set(new) and "down_blocks_0/resnets_2/conv2/kernel" in new
  for name in ("text_encoder", "vae"):
    for path, value in flatten(grown.params[name]).items():
      np.testing.assert_array_equal(value, flatten(source.params[name])[path])
  assert main(["make-toy-model", "--workdir", str(tmp_path / "c"), "--grow-layers", "2,2"]) != 0
  assert "--start-from" in capsys.readouterr().err
  assert not (tmp_path / "c").exists()


def test_toy_configs_are_the_zero_snr_v_prediction_family():
  from persona_jax.convert.diffusers_folder import model_index, parse_configs
  raw = dict(tm.toy_configs(), model_index=model_index())
  configs = parse_configs(raw)
  s = configs["scheduler_config"]
  assert (s.prediction_type, s.timestep_spacing, s.rescale_betas_zero_snr) == ("v_prediction", "trailing", True)
  assert configs["unet_config"].sample_size * configs["vae_config"].downsample_factor == tm.RESOLUTION
  assert configs["text_encoder_config"].vocab_size == 49408


def test_shipped_base_becomes_the_default_in_the_cache(model_dirs, tmp_path, monkeypatch):
  """ship() writes float16 weights without tokenizer files; the default copies them with the
  shipped tokenizer into a complete folder that loads as the same model (to float16 rounding)."""
  from persona_jax import default_model
  from persona_jax.convert.files import read_safetensors
  from persona_jax.pipeline import load_pipeline
  from persona_jax.tree import flatten
  shipped = tm.ship(model_dirs["sd1"], tmp_path / "toy_base")
  assert not (shipped / "tokenizer").exists()
  weights = read_safetensors(shipped / "unet" / "diffusion_pytorch_model.safetensors")
  assert {v.dtype for v in weights.values()} == {np.dtype(np.float16)}
  monkeypatch.setattr(default_model, "shipped_base_dir", lambda: shipped)
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  folder = default_model.default_model_dir()
  digest = (shipped / default_model.VERSION_FILE).read_text().strip()
  assert digest == tm.weights_digest(shipped) and len(digest) == 12
  assert folder.parent == tmp_path / "cache" / "models"
  assert folder.name.startswith(f"toy-world-base-{digest}-")    # then every shipped file's digest
  assert (folder / "tokenizer" / "vocab.json").is_file()
  ours, base = flatten(load_pipeline(folder).params), flatten(load_pipeline(model_dirs["sd1"]).params)
  assert ours.keys() == base.keys()
  for path, value in base.items():
    np.testing.assert_allclose(ours[path], np.asarray(value, np.float16).astype(np.float32),
                               err_msg=path)
  assert default_model.default_model_dir() == folder      # the second call reuses the copy
  # Another shipped base is another cache folder: an old copy never shadows it.
  (shipped / default_model.VERSION_FILE).write_text("0123456789ab\n")
  assert default_model.default_model_dir().name.startswith("toy-world-base-0123456789ab-")
