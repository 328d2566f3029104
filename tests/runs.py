"""Small training runs for tests: configs on the sd1 random model and the example subject."""

import dataclasses

from persona_jax.train.config import run_config


def ti_config(model_dir, **overrides):
  """Textual Inversion on the sd1 random model, 32px, batch 2, no sampling, fast logging."""
  values = dict(
      model=str(model_dir),
      method=dict(name="textual_inversion", placeholder="<my-toy>", initializer="ball",
                  num_vectors=2),
      data=dict(caption_source="templates", prompt="<my-toy>", templates="object", resolution=32),
      optim=dict(lr=5e-3, clip_grad_norm=0.0, weight_decay=0.0),
      steps=4, batch_size=2, log_every=1, checkpoint_every=2, sample_prompts=())
  for k, v in overrides.items():
    if isinstance(v, dict) and isinstance(values.get(k), dict):
      values[k] = {**values[k], **v}
    else:
      values[k] = v
  return run_config(values)


def replace(config, **kw):
  return dataclasses.replace(config, **kw)


def one_device_mesh():
  """Tests run with 8 simulated CPU devices; single-device runs use the first."""
  import jax

  from persona_jax.parallel.mesh import make_mesh
  return make_mesh(devices=jax.devices()[:1])
