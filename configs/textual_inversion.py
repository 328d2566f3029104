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

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(name="textual_inversion", placeholder="<my-toy>",
                             initializer="ball" if tiny else "toy", num_vectors=1))
  c.data = ConfigDict(dict(instance_dir="" if tiny else "/path/to/images",
                           caption_source="templates", prompt="<my-toy>", templates="object",
                           resolution=32 if tiny else 512, center_crop=True, random_flip=0.5,
                           caption_dropout=0.0))
  c.optim = ConfigDict(dict(lr=5e-3 if tiny else 5e-4, scale_lr=not tiny, schedule="constant",
                            warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                            clip_grad_norm=0.0, grad_accum=1 if tiny else 4, groups=(),
                            ema_decay=0.0))
  c.steps = 30 if tiny else 3000
  c.batch_size = 2 if tiny else 1
  c.seed = 0
  c.mixed_precision = "no" if tiny else "bf16"
  c.remat = "none"
  c.min_snr_gamma = 0.0
  c.offset_noise = 0.0
  c.fsdp = 1
  c.sharding = ()
  c.log_every = 5 if tiny else 50
  c.checkpoint_every = 10 if tiny else 500
  c.keep_checkpoints = 3
  c.sample_every = 0 if tiny else 500
  c.sample_prompts = (("a photo of a <my-toy>", "a photo of a <my-toy> on grass") if tiny else
                      ("a photo of <my-toy>", "a painting of <my-toy> in the snow"))
  c.sample_negative_prompt = ""
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 7.5
  c.sample_images = 2
  c.sample_seed = 0
  return c
