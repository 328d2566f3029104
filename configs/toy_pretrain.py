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

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else ""
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(name="dreambooth", train_text_encoder=True, text_encoder_lr=0.0,
                             prior_loss_weight=1.0))
  # Captions name positions (left/right): no flips. 10% empty captions for classifier-free guidance.
  c.data = ConfigDict(dict(instance_dir="", caption_source="prompt" if tiny else "files",
                           prompt="a photo of a toy" if tiny else "", templates="object",
                           resolution=32, center_crop=True, random_flip=0.0, caption_dropout=0.1,
                           # The object's latent pixels count 5x (its coverage masks, written with
                           # the world): class, colour and pattern live there, on a fraction of
                           # the image (sitting 3: class lagged at 35% after 9750 unweighted steps).
                           mask_loss_weight=0.0 if tiny else 4.0))
  c.optim = ConfigDict(dict(lr=3e-4, scale_lr=False, schedule="cosine",
                            warmup_steps=5 if tiny else 500, b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=1e-2, clip_grad_norm=1.0, grad_accum=1, groups=(),
                            ema_decay=0.0 if tiny else 0.999))
  c.steps = 20 if tiny else 20000
  c.batch_size = 8 if tiny else 64
  c.seed = 0
  c.mixed_precision = "no"
  c.remat = "none"
  c.min_snr_gamma = 5.0
  c.offset_noise = 0.0
  c.fsdp = 1
  c.sharding = ()
  c.log_every = 5 if tiny else 50
  c.checkpoint_every = 10 if tiny else 250
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 1000
  c.sample_prompts = ("a photo of a red ball on a blue background",
                      "a photo of a yellow and black striped box on grass",
                      "a photo of a small white star on the left on a purple background",
                      "a photo of a green flower")
  c.sample_negative_prompt = ""
  c.sample_steps = 25
  c.sample_guidance = 4.0
  c.sample_images = 4
  c.sample_seed = 0
  return c
