"""Small training runs for tests: configs on the sd1 random model and the example subject."""

import dataclasses
import os
import subprocess
import sys

from persona_jax.train.config import run_config


def _merge(values, overrides):
  for k, v in overrides.items():
    if isinstance(v, dict) and isinstance(values.get(k), dict):
      values[k] = {**values[k], **v}
    else:
      values[k] = v
  return run_config(values)


def db_config(model_dir, class_dir, **overrides):
  """DreamBooth (UNet only) with 2 class images from `class_dir`, 32px, batch 1 + 1 class row."""
  values = dict(
      model=str(model_dir),
      method=dict(name="dreambooth"),
      data=dict(caption_source="prompt", prompt="a photo of sks toy", resolution=32,
                num_class_images=2, class_dir=str(class_dir), class_prompt="a photo of toy",
                class_generate=False),
      optim=dict(lr=1e-4, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=1, log_every=1, checkpoint_every=2, sample_prompts=(),
      sharding=(("unet/.*", "fsdp"), ("text_encoder/.*", "fsdp")))
  return _merge(values, overrides)


def lora_config(model_dir, **overrides):
  """LoRA on the sd1 random model, 32px, batch 2, one warm-up step (lr 0 at step 0)."""
  values = dict(
      model=str(model_dir), method=dict(name="lora", rank=2),
      data=dict(caption_source="prompt", prompt="a photo of sks toy", resolution=32),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


def ip_config(model_dir, encoder_dir, **overrides):
  """The example subject's 4 images, 32px, batch 2, one warm-up step (lr 0 at step 0)."""
  values = dict(
      model=str(model_dir),
      method=dict(name="ip_adapter", image_encoder=str(encoder_dir)),
      data=dict(caption_source="templates", prompt="ball", templates="object", resolution=32),
      optim=dict(lr=1e-2, clip_grad_norm=0.0, weight_decay=0.0, warmup_steps=1),
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


def write_config_file(path, values: dict):
  """A config file (`persona-jax train --config PATH`) returning `values` (a resolved config's
  dict); returns its path."""
  import json
  from pathlib import Path
  path = Path(path)
  path.write_text("import json\nfrom ml_collections import ConfigDict\n\n"
                  "def get_config(arg=None):\n"
                  f"  return ConfigDict(json.loads({json.dumps(json.dumps(values))}))\n")
  return path


def write_image_encoder(folder, seed: int = 0, **config):
  """A random CLIPVisionModelWithProjection folder written by our own tooling: 16px, patch 8,
  16 wide, 4 layers, projection 16, quick_gelu unless `config` (CLIPVisionConfig fields) says
  otherwise; its image processor at that size. Returns the folder."""
  import jax
  import jax.numpy as jnp

  from persona_jax.data.clip_images import CLIPImageProcessorConfig
  from persona_jax.image_encoder import save_image_encoder
  from persona_jax.models.clip_vision import CLIPVisionModel
  from persona_jax.models.configs import CLIPVisionConfig
  config = CLIPVisionConfig(**{**dict(hidden_size=16, intermediate_size=32, projection_dim=16,
                                      num_hidden_layers=4, num_attention_heads=2, image_size=16,
                                      patch_size=8, with_projection=True), **config})
  size = config.image_size
  params = CLIPVisionModel(config).init(jax.random.PRNGKey(seed),
                                        jnp.zeros((1, size, size, 3)))["params"]
  return save_image_encoder(folder, config, params,
                            processor=CLIPImageProcessorConfig.for_image_size(size))


def write_class_images(folder, n=2, size=40, seed=0):
  """`n` random RGB images (stand-ins for sampled class images); returns the folder."""
  import numpy as np
  from PIL import Image
  from pathlib import Path
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"c{i}.png")
  return folder


def ti_config(model_dir, **overrides):
  """Textual Inversion on the sd1 random model, 32px, batch 2, no sampling, fast logging."""
  values = dict(
      model=str(model_dir),
      method=dict(name="textual_inversion", placeholder="<my-toy>", initializer="ball",
                  num_vectors=2),
      data=dict(caption_source="templates", prompt="<my-toy>", templates="object", resolution=32),
      optim=dict(lr=5e-3, clip_grad_norm=0.0, weight_decay=0.0),
      steps=4, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  return _merge(values, overrides)


def replace(config, **kw):
  return dataclasses.replace(config, **kw)


def one_device_mesh():
  """Tests run with 8 simulated CPU devices; single-device runs use the first."""
  import jax

  from persona_jax.parallel.mesh import make_mesh
  return make_mesh(devices=jax.devices()[:1])


def fixed_batch_trajectory(run, steps: int = 8, keep_states: bool = False):
  """Steps on the run's first batch: step 0 has lr 0 (the configs' one warm-up step); the last
  step re-runs with the step counter at 0, i.e. step 0's noise, timesteps and latents, so the two
  losses are comparable. One compiled step. `keep_states`: also `states`, the trainable tree
  after the lr-0 step and after each step."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from persona_jax.data.pipeline import make_iterator
  from persona_jax.train.state import init_state
  from persona_jax.train.step import train_step
  batch = jax.tree.map(jnp.asarray, next(make_iterator(run.dataset)))
  step = jax.jit(functools.partial(train_step, method=run.method, models=run.models,
                                   objective=run.objective, tx=run.tx))
  frozen_before = jax.tree.map(np.array, run.frozen)
  state, m0 = step(init_state(run.trainable, run.tx, seed=0), run.frozen, batch)
  after_lr0 = jax.device_get(state.trainable)
  states = [after_lr0]
  for _ in range(steps):
    state, _ = step(state, run.frozen, batch)
    if keep_states:
      states.append(jax.device_get(state.trainable))
  _, m_end = step(state.replace(step=jnp.zeros((), jnp.int32)), run.frozen, batch)
  return dict(batch=jax.device_get(batch), frozen_before=frozen_before, after_lr0=after_lr0,
              loss0=float(m0["loss"]), loss_end=float(m_end["loss"]),
              trained=jax.device_get(state.trainable), **({"states": states} if keep_states else {}))


def assert_training_bar(run, trajectory) -> None:
  """DESIGN 5's training bar on a `fixed_batch_trajectory`: lr 0 moves nothing, every trainable
  leaf moves (weight decay 0: Adam moves a leaf iff its gradient is non-zero), the loss falls on
  the fixed batch, and the frozen params stay bit-identical."""
  import jax
  import numpy as np

  from persona_jax import tree
  for a, b in zip(jax.tree.leaves(trajectory["after_lr0"]), jax.tree.leaves(run.trainable)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  init, trained = tree.flatten(run.trainable), tree.flatten(trajectory["trained"])
  still = [p for p in init if np.array_equal(np.asarray(trained[p]), np.asarray(init[p]))]
  assert not still, f"{still[:3]} never got a gradient"
  assert trajectory["loss_end"] < trajectory["loss0"]
  for a, b in zip(jax.tree.leaves(trajectory["frozen_before"]), jax.tree.leaves(run.frozen)):
    assert np.array_equal(a, np.asarray(b))


def run_cli(*args, timeout: int = 900) -> None:
  """`python -m persona_jax ARGS` in a subprocess as a user runs it: one device and XLA's usual
  optimization (the tests' 8 simulated devices and -O0 compilation, from conftest's XLA_FLAGS,
  would make long runs several times slower). Fails with the tail of its stderr."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-m", "persona_jax", *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
