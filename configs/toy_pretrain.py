"""Pre-training the toy-world base: the UNet and the CLIP text encoder from random initialization,
together, on rendered world scenes (a full fine-tune of both through the ordinary train step).

`persona-jax make-toy-model --workdir runs/toy` runs it after building its inputs (the scene
folder, the VAE, the initial pipeline; persona_jax/world/toy_model.py) and fills in
`model` and `data.instance_dir`; by hand:
  persona-jax train --config configs/toy_pretrain.py --workdir runs/toy/unet \\
      --config.model=runs/toy/init --config.data.instance_dir=runs/toy/world
Resumable like every run: the same command continues from the last checkpoint, so it can run in
several sittings. `:tiny` is a 20-step smoke run of the same recipe on the embedded default and
the bundled example subject (captioned by one prompt).
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("dreambooth")
  c.model = "default" if tiny else ""
  c.method.train_text_encoder = True
  # Captions name positions (left/right): no flips. 10% empty captions for classifier-free guidance.
  c.data.caption_source = "prompt" if tiny else "files"
  c.data.prompt = "a photo of a toy" if tiny else ""
  c.data.resolution = 32
  c.data.random_flip = 0.0
  c.data.caption_dropout = 0.1
  # The object's latent pixels count 5x (its coverage masks, written with the world): class,
  # colour and pattern live there, on a fraction of the image (sitting 3: class lagged at 35%
  # after 9750 unweighted steps).
  c.data.mask_loss_weight = 0.0 if tiny else 4.0
  c.optim.lr = 3e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 5 if tiny else 500
  c.optim.ema_decay = 0.0 if tiny else 0.999
  c.steps = 20 if tiny else 20000
  c.batch_size = 8 if tiny else 64
  c.min_snr_gamma = 5.0
  c.log_every = 5 if tiny else 50
  c.checkpoint_every = 10 if tiny else 250
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 1000
  c.sample_prompts = ("a photo of a red ball on a blue background",
                      "a photo of a yellow and black striped box on grass",
                      "a photo of a small white star on the left on a purple background",
                      "a photo of a green flower")
  c.sample_guidance = 4.0
  c.sample_images = 4
  return c
