"""Textual Inversion: learn a new word for a subject from a few images (Gal et al. 2022).

  persona-jax train --config textual_inversion:tiny --workdir runs/ti
    ~1 minute on 2 CPU cores: 30 steps on the embedded default and the bundled example subject
    (the default model is random until the toy-world model lands: the samples show the pipeline,
    not the subject).
  persona-jax train --config configs/textual_inversion.py --workdir runs/ti \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/images
    The diffusers README recipe: batch 1 x 4 accumulated, lr 5e-4 scaled (2e-3), 3000 steps.

Writes WORKDIR/learned_embeds.safetensors ({placeholder: [num_vectors, D]}, diffusers' format).
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("textual_inversion")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.method.placeholder = "<my-toy>"
  c.method.initializer = "ball" if tiny else "toy"
  c.data.instance_dir = "" if tiny else "/path/to/images"
  c.data.prompt = "<my-toy>"
  c.data.resolution = 32 if tiny else 512
  c.optim.lr = 5e-3 if tiny else 5e-4
  c.optim.scale_lr = not tiny
  c.optim.clip_grad_norm = 0.0
  c.optim.grad_accum = 1 if tiny else 4
  c.steps = 30 if tiny else 3000
  c.batch_size = 2 if tiny else 1
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 50
  c.checkpoint_every = 10 if tiny else 500
  c.sample_every = 0 if tiny else 500
  c.sample_prompts = (("a photo of a <my-toy>", "a photo of a <my-toy> on grass") if tiny else
                      ("a photo of <my-toy>", "a painting of <my-toy> in the snow"))
  c.sample_steps = 10 if tiny else 50
  return c
