"""E4T domain pre-training: an encoder that predicts a concept's word embedding from one image,
and attention weight offsets, trained on many images of one domain (Gal et al. 2023).

  persona-jax train --config e4t_pretrain:tiny --workdir runs/e4t_pre
    ~1 minute on 2 CPU cores: 30 steps on the embedded default (its image_encoder/) with the
    bundled example subject standing in for a domain of balls; scripts/make_e4t_state.py runs the
    same recipe on a folder of toy-world balls.
  persona-jax train --config configs/e4t_pretrain.py --workdir runs/e4t_faces \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/faces \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14
    The reference's recipe (mkshing/e4t-diffusion): batch 16, lr 1.6e-5, 30,000 steps (faces;
    cats 60,000, art 100,000), embedding regularization 0.01, CLIP frozen. Any transformers
    CLIPVisionModel(WithProjection) folder serves as the image encoder (the reference: OpenCLIP
    ViT-H/14).

Writes WORKDIR/e4t.safetensors (encoder and offsets), the start of `e4t_tune`.
"""

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(
      name="e4t", phase="pretrain", class_word="ball" if tiny else "face", placeholder="*s",
      scale=0.1, image_encoder="", train_image_encoder=False, encoder_width=0, offset_rank=4,
      embedding_reg=0.01, offset_reg=0.01, pretrained=""))
  c.data = ConfigDict(dict(instance_dir="" if tiny else "/path/to/domain_images",
                           caption_source="templates", prompt="*s", templates="object",
                           resolution=32 if tiny else 512, center_crop=True, random_flip=0.5,
                           random_zoom=1.0, num_images=0, caption_dropout=0.0))
  c.optim = ConfigDict(dict(lr=1e-3 if tiny else 1.6e-5, scale_lr=False, schedule="constant",
                            warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                            clip_grad_norm=1.0, grad_accum=1, groups=(), ema_decay=0.0))
  c.steps = 30 if tiny else 30000
  c.batch_size = 4 if tiny else 16
  c.seed = 0
  c.mixed_precision = "no" if tiny else "bf16"
  c.remat = "none"
  c.min_snr_gamma = 0.0
  c.offset_noise = 0.0
  c.fsdp = 1
  c.sharding = ()
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 1000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 2000
  c.sample_prompts = (("a photo of a *s", "a photo of a *s on grass") if tiny else
                      ("a photo of *s", "a painting of *s in the snow"))
  c.sample_negative_prompt = ""
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 7.5
  c.sample_images = 2
  c.sample_seed = 0
  return c
