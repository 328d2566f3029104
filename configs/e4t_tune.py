"""E4T domain tuning: a few steps on one image from an e4t_pretrain state; encoder, weight
offsets and the whole UNet train (Gal et al. 2023: "a single image and as few as 5 training
steps").

  persona-jax train --config e4t_tune:tiny --workdir runs/e4t
    ~1 minute on 2 CPU cores: 15 steps on the first image of the bundled example subject (a pink
    ball with yellow dots), starting from the small pre-trained state shipped in
    persona_jax/assets/e4t_tiny/ (scripts/make_e4t_state.py), or from an e4t_pretrain run with
    --config.method.pretrained=runs/e4t_pre.
  persona-jax train --config configs/e4t_tune.py --workdir runs/e4t_face \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.method.pretrained=runs/e4t_faces \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14 \\
      --config.data.instance_dir=/path/to/one_face
    The reference's recipe: 15 steps, batch 16 of augmented copies of the image (random flips and
    zoomed random crops here), lr 1.6e-5, embedding regularization 1e-4.
  persona-jax sample --e4t runs/e4t --image /path/to/the/image.png --prompt "a painting of *s" --out out

Writes WORKDIR/e4t.safetensors (encoder, offsets and the tuned UNet).
"""

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(
      name="e4t", phase="tune", class_word="ball" if tiny else "face", placeholder="*s",
      scale=0.1, image_encoder="", train_image_encoder=False, encoder_width=0, offset_rank=4,
      embedding_reg=1e-4, offset_reg=0.01,
      pretrained="shipped" if tiny else "/path/to/e4t_pretrain/workdir"))
  c.data = ConfigDict(dict(instance_dir="" if tiny else "/path/to/one/image",
                           caption_source="templates", prompt="*s", templates="object",
                           resolution=32 if tiny else 512, center_crop=False, random_flip=0.5,
                           random_zoom=1.25, num_images=1, caption_dropout=0.0))
  c.optim = ConfigDict(dict(lr=1e-4 if tiny else 1.6e-5, scale_lr=False, schedule="constant",
                            warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                            clip_grad_norm=1.0, grad_accum=1, groups=(), ema_decay=0.0))
  c.steps = 15
  c.batch_size = 4 if tiny else 16
  c.seed = 0
  c.mixed_precision = "no" if tiny else "bf16"
  c.remat = "none"
  c.min_snr_gamma = 0.0
  c.offset_noise = 0.0
  c.fsdp = 1
  c.sharding = ()
  c.log_every = 5
  c.checkpoint_every = 15
  c.keep_checkpoints = 1
  c.sample_every = 0
  c.sample_prompts = (("a photo of a *s", "a photo of a *s on grass") if tiny else
                      ("a photo of *s", "a painting of *s in the snow"))
  c.sample_negative_prompt = ""
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 7.5
  c.sample_images = 2
  c.sample_seed = 0
  return c
