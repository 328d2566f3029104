"""The toy world's metric encoder: a small CNN, trained on the world's scenes only, that predicts a
scene's attributes (class, colour, pattern, pattern colour, background) and gives a feature
vector for image-to-image similarity (our DINO / CLIP-I analog). It is not the pipeline's image
encoder: methods never see it, so it can judge them.

`python -m persona_jax.world.metric_encoder OUT` trains one and prints its held-out accuracy;
`load()` reads assets/world_metric/ (model.safetensors + config.json, float16) once one that
meets the 95% bar is shipped. It trains on fresh scenes at every step (the batched JAX
renderer), over every look, the held-out ones included: it judges subjects, and is no
generative model's training data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from persona_jax import tree
from persona_jax.world import scenes

HEADS = tuple(scenes.ATTRIBUTES)          # class, colour, pattern, pattern_colour, background


@dataclasses.dataclass(frozen=True)
class MetricConfig:
  widths: tuple[int, ...] = (32, 64, 96)
  features: int = 256


class MetricEncoder(nn.Module):
  """uint8-range images [B, 32, 32, 3] (float, 0..255) -> (features [B, F] unit-norm,
  {attribute: logits [B, n_values]})."""
  config: MetricConfig = MetricConfig()

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = nn.silu(nn.Conv(self.config.widths[0], (3, 3), name="stem")(x))       # 32 x 32
    x = nn.silu(nn.GroupNorm(8, name="stem_norm")(nn.Conv(self.config.widths[0], (3, 3),
                                                          name="stem_conv")(x)))
    for i, w in enumerate(self.config.widths):           # 32 -> 16 -> 8 -> 4
      x = nn.Conv(w, (3, 3), strides=2, name=f"down{i}")(x)
      for j in range(2 if i else 1):
        x = nn.Conv(w, (3, 3), name=f"conv{i}{j}")(x)
        x = nn.silu(nn.GroupNorm(8, name=f"norm{i}{j}")(x))
    h = nn.silu(nn.Dense(self.config.features, name="embed")(x.reshape(x.shape[0], -1)))
    logits = {k: nn.Dense(len(scenes.ATTRIBUTES[k]), name=f"head_{k}")(h) for k in HEADS}
    return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-6), logits


def labels(scene_list) -> dict[str, np.ndarray]:
  """{attribute: int32 [B]} indices into scenes.ATTRIBUTES."""
  attrs = [scenes.scene_attributes(s) for s in scene_list]
  return {k: np.asarray([scenes.ATTRIBUTES[k].index(a[k]) for a in attrs], np.int32) for k in HEADS}


def scene_batch(seed: int, split: str, start: int, n: int) -> list:
  """Scenes start..start+n-1 of a split over every look (held-out looks included)."""
  return [scenes.sample_scene(seed, split, k, held_out=True) for k in range(start, start + n)]


def augment(rng, images):
  """What generations add to clean renders: a slight blur, pixel noise, a little brightness.
  images float [B, 32, 32, 3] in 0..255."""
  import jax.numpy as jnp
  k1, k2, k3 = jax.random.split(rng, 3)
  b = images.shape[0]
  blur = 0.25 * (jnp.roll(images, 1, 1) + jnp.roll(images, -1, 1) + jnp.roll(images, 1, 2)
                 + jnp.roll(images, -1, 2))
  amount = jax.random.uniform(k1, (b, 1, 1, 1), maxval=0.5)
  x = (1 - amount) * images + amount * blur
  x = x * jax.random.uniform(k2, (b, 1, 1, 1), minval=0.95, maxval=1.05)
  x = x + jax.random.normal(k3, x.shape) * jax.random.uniform(k3, (b, 1, 1, 1), maxval=8.0)
  return jnp.clip(x, 0, 255)


def train_metric_encoder(out: Path | None = None, *, steps: int = 4000, batch_size: int = 128,
                         lr: float = 2e-3, seed: int = 0, log=print, checkpoint_every: int = 250):
  """Trains on fresh "train"-split scenes of every look at each step (rendered by
  `scenes.render_batch`, augmented); returns (config, params). With `out`, resumable: the state
  is saved to OUT/checkpoint.msgpack every `checkpoint_every` steps (step k's scenes depend on k
  only, so a resumed run is the uninterrupted one)."""
  from flax import serialization
  config = MetricConfig()
  model = MetricEncoder(config)
  t0 = time.perf_counter()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 200, steps, lr * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, arrays, targets, rng):
    x = augment(rng, scenes.render_batch(arrays))

    def loss_fn(p):
      _, logits = model.apply({"params": p}, x)
      return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], targets[k]).mean()
                 for k in HEADS)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  start = 0
  checkpoint = Path(out) / "checkpoint.msgpack" if out is not None else None
  if checkpoint is not None and checkpoint.is_file():
    restored = serialization.from_bytes({"params": params, "opt": opt, "step": 0},
                                        checkpoint.read_bytes())
    params, opt, start = restored["params"], restored["opt"], int(restored["step"])
    log(f"resuming from step {start} ({checkpoint})")
  for k in range(start, steps):
    scene_list = scene_batch(seed, "train", k * batch_size, batch_size)
    params, opt, loss = step(params, opt, scenes.scene_arrays(scene_list), labels(scene_list),
                             jax.random.fold_in(jax.random.PRNGKey(seed), k))
    if checkpoint is not None and ((k + 1) % checkpoint_every == 0 or k + 1 == steps):
      checkpoint.parent.mkdir(parents=True, exist_ok=True)
      tmp = checkpoint.with_suffix(".tmp")
      tmp.write_bytes(serialization.to_bytes({"params": params, "opt": opt, "step": k + 1}))
      tmp.replace(checkpoint)
    if (k + 1) % 500 == 0:
      acc = accuracy(config, params, n=500, fast=True)
      log(f"step {k + 1}: loss {float(loss):.4f}, held-out "
          + " ".join(f"{h} {a:.3f}" for h, a in acc.items()) + f" ({time.perf_counter() - t0:.0f} s)")
  if out is not None:
    save(out, config, params)
  return config, params


def predict(config: MetricConfig, params, images, chunk: int = 250):
  """(features [N, F], {attribute: predicted index [N]}) of uint8 images [N, 32, 32, 3]."""
  apply = _apply_fn(config)
  outs = [apply(params, jnp.asarray(images[i: i + chunk], jnp.float32)) for i in range(0, len(images), chunk)]
  feats = np.concatenate([np.asarray(f) for f, _ in outs])
  return feats, {k: np.concatenate([np.argmax(np.asarray(l[k]), -1) for _, l in outs]) for k in HEADS}


@functools.lru_cache(maxsize=4)
def _apply_fn(config: MetricConfig):
  return jax.jit(lambda p, x: MetricEncoder(config).apply({"params": p}, x))


def accuracy(config: MetricConfig, params, seed: int = 1, n: int = 2000, fast: bool = False,
             scene_list=None) -> dict[str, float]:
  """Per-attribute accuracy on n held-out ("test" split, every look) scenes, rendered by the
  reference `scenes.render` (`fast`: by `render_batch`)."""
  scene_list = scene_list or scene_batch(seed, "test", 0, n)
  if fast:
    images = np.asarray(jax.jit(scenes.render_batch)(scenes.scene_arrays(scene_list))).round()
  else:
    images = np.stack([scenes.render(sc) for sc in scene_list])
  y = labels(scene_list)
  _, predicted = predict(config, params, images)
  return {k: float(np.mean(predicted[k] == y[k])) for k in HEADS}


def save(out, config: MetricConfig, params) -> Path:
  from persona_jax.convert.files import write_json, write_safetensors
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  flat = {p: np.asarray(v, np.float16) for p, v in tree.flatten(params).items()}
  write_safetensors(out / "model.safetensors", flat, {"format": "persona_jax-world-metric"})
  write_json(out / "config.json", dataclasses.asdict(config))
  return out


def shipped_dir() -> Path:
  import importlib.resources
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "world_metric"))


def load(folder: Path | None = None):
  """(config, float32 params) of a saved metric encoder (default: the shipped one)."""
  from persona_jax.convert.files import read_safetensors
  folder = Path(folder) if folder is not None else shipped_dir()
  raw = json.loads((folder / "config.json").read_text())
  config = MetricConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
  params = tree.unflatten({p: jnp.asarray(v, jnp.float32)
                           for p, v in read_safetensors(folder / "model.safetensors").items()})
  return config, params


if __name__ == "__main__":
  import sys
  target = Path(sys.argv[1]) if len(sys.argv) > 1 else shipped_dir()
  cfg, trained = train_metric_encoder(target)
  print(json.dumps(accuracy(cfg, trained), indent=2))
