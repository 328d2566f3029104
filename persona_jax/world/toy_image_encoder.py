"""The toy pipeline's CLIP image encoder (`image_encoder/`), trained contrastively against the
pipeline's own text encoder on world scenes; E4T, InstantBooth and IP-Adapter read it.

CLIP's recipe at toy scale: a ViT (CLIP vision architecture, 32x32 images in 4x4 patches) with
its visual projection, and a linear text projection on the frozen text encoder's pooled (EOS)
output; a symmetric InfoNCE loss with a learned temperature over fresh scenes and their captions
at every step. The text side only steers training; the image encoder is shipped as a transformers
`CLIPVisionModelWithProjection` folder with the CLIP image processor's config (32x32, CLIP
mean/std). It is not the metric encoder (which judges methods and is trained apart).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from persona_jax.data.clip_images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageProcessorConfig
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig
from persona_jax.world import scenes

log = logging.getLogger(__name__)


def toy_vision_config() -> CLIPVisionConfig:
  """~0.2M-param ViT: width 64, 4 layers, 4 heads, 32x32 images in 4x4 patches."""
  return CLIPVisionConfig(hidden_size=64, intermediate_size=256, projection_dim=64,
                          num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4,
                          with_projection=True)


def processor_config() -> CLIPImageProcessorConfig:
  return CLIPImageProcessorConfig.for_image_size(32)


def normalize(images_0_255):
  """uint8-range images [B, 32, 32, 3] -> CLIP-normalized pixel values."""
  x = images_0_255 / 255.0
  mean = jnp.asarray(OPENAI_CLIP_MEAN).reshape(1, 1, 1, 3)
  return (x - mean) / jnp.asarray(OPENAI_CLIP_STD).reshape(1, 1, 1, 3)


@dataclasses.dataclass(frozen=True)
class ContrastiveTraining:
  steps: int = 3000
  batch_size: int = 128
  lr: float = 1e-3
  warmup_steps: int = 200
  seed: int = 0


class _Towers(nn.Module):
  """The image tower and the text projection (on precomputed pooled text features)."""
  config: CLIPVisionConfig
  text_width: int

  @nn.compact
  def __call__(self, pixel_values, text_pooled):
    image = CLIPVisionModel(self.config, name="image_encoder")(pixel_values).image_embeds
    text = nn.Dense(self.config.projection_dim, use_bias=False, name="text_projection")(text_pooled)
    scale = self.param("logit_scale", lambda _: jnp.asarray(np.log(1 / 0.07), jnp.float32))
    return image, text, scale


def clip_loss(image, text, logit_scale):
  """Symmetric InfoNCE of [B, P] image and text embeddings (matching rows are pairs)."""
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  logits = jnp.exp(jnp.clip(logit_scale, 0, np.log(100))) * image @ text.T
  labels = jnp.arange(image.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def train_image_encoder(pipe, t: ContrastiveTraining = ContrastiveTraining(), log_fn=log.info):
  """Trains against `pipe`'s (frozen) text encoder on fresh world scenes; returns
  (CLIPVisionConfig, params of both towers: {"image_encoder", "text_projection", "logit_scale"},
  the last step's loss)."""
  from persona_jax.tokenizer import tokenize
  config = toy_vision_config()
  towers = _Towers(config, pipe.text_encoder_config.hidden_size)
  rng = jax.random.PRNGKey(t.seed)
  params = towers.init(rng, jnp.zeros((1, 32, 32, 3)),
                       jnp.zeros((1, pipe.text_encoder_config.hidden_size)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, t.steps, t.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
  opt = tx.init(params)
  text_params = pipe.params["text_encoder"]

  @jax.jit
  def step(params, opt, arrays, ids):
    pooled = pipe.text_encoder.apply({"params": text_params}, ids).pooled
    pixels = normalize(scenes.render_batch(arrays))

    def loss_fn(p):
      return clip_loss(*towers.apply({"params": p}, pixels, pooled))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  start = time.perf_counter()
  loss = None
  for k in range(t.steps):
    first = k * t.batch_size
    scene_list = [scenes.sample_scene(t.seed, "train", first + i) for i in range(t.batch_size)]
    captions = [scenes.caption(s, scenes._rng(t.seed, "clip caption", first + i))
                for i, s in enumerate(scene_list)]
    params, opt, loss = step(params, opt, scenes.scene_arrays(scene_list),
                             tokenize(pipe.tokenizer, captions))
    if (k + 1) % 250 == 0 or k + 1 == t.steps:
      log_fn(f"image encoder step {k + 1}/{t.steps}: loss {float(loss):.4f} "
             f"({time.perf_counter() - start:.0f} s)")
  return config, params, float(loss)


def retrieval_accuracy(pipe, config, params, n: int = 256, seed: int = 7) -> float:
  """CLIP's own check: over n "test" scenes with full captions, the fraction of images whose
  most similar caption (among the n) says what theirs says. `params` as train_image_encoder's."""
  from persona_jax.tokenizer import tokenize
  scene_list = [scenes.sample_scene(seed, "test", k) for k in range(n)]
  captions = [scenes.caption(s) for s in scene_list]
  pooled = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]},
                                   tokenize(pipe.tokenizer, captions)).pooled
  pixels = normalize(jnp.asarray(np.stack([scenes.render(s) for s in scene_list]), jnp.float32))
  image, text, _ = _Towers(config, pipe.text_encoder_config.hidden_size).apply(
      {"params": params}, pixels, pooled)
  best = np.asarray(jnp.argmax(image @ text.T, axis=-1))
  return float(np.mean([captions[b] == c for b, c in zip(best, captions)]))


def write_image_encoder(pipeline_dir: Path, config, params) -> Path:
  """Writes PIPELINE/image_encoder (float16 weights, with the image processor's config) from
  train_image_encoder's params."""
  from persona_jax.image_encoder import save_image_encoder
  return save_image_encoder(Path(pipeline_dir) / "image_encoder", config, params["image_encoder"],
                            processor=processor_config(), dtype=np.float16, overwrite=True)
