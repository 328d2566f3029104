"""The toy image encoder's contrastive trainer: its loss, and the folder it writes loads as a
transformers CLIPVisionModelWithProjection (ours and transformers')."""

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.world import toy_image_encoder as tie


def test_clip_loss_is_low_for_pairs_and_high_for_mismatches():
  e = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
  scale = jnp.log(100.0)
  assert float(tie.clip_loss(e, e, scale)) < 0.05
  assert float(tie.clip_loss(e, jnp.roll(e, 1, axis=0), scale)) > 5.0


def test_trains_and_writes_a_folder_transformers_loads(pipes, tmp_path):
  import torch
  from transformers import CLIPVisionModelWithProjection

  from persona_jax.data.clip_images import CLIPImageProcessorConfig
  from persona_jax.image_encoder import load_image_encoder
  from persona_jax.models.clip_vision import CLIPVisionModel
  pipe = pipes["sd1"]
  config, params, loss = tie.train_image_encoder(
      pipe, tie.ContrastiveTraining(steps=2, batch_size=8, warmup_steps=1), log_fn=lambda m: None)
  assert np.isfinite(loss) and set(params) == {"image_encoder", "text_projection", "logit_scale"}
  folder = tie.write_image_encoder(tmp_path / "pipe", config, params)
  ours_config, ours = load_image_encoder(folder)
  assert ours_config.with_projection and ours_config.image_size == 32
  processor = CLIPImageProcessorConfig.from_dict(
      __import__("json").loads((folder / "preprocessor_config.json").read_text()))
  assert processor.crop_size == (32, 32)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  embeds = CLIPVisionModel(ours_config).apply({"params": ours}, pixels).image_embeds
  theirs = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = theirs(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
  np.testing.assert_allclose(np.asarray(embeds), ref, atol=2e-4, rtol=2e-3)
