"""IP-Adapter training: an image projection and decoupled cross-attention (to_k_ip/to_v_ip) on a
frozen model, each image conditioning its own reconstruction (Ye et al. 2023).

  persona-jax train --config ip_adapter:tiny --workdir runs/ip
    ~1 minute on 2 CPU cores (60 s measured, 28 s of it the 20 steps, the rest compilation and
    the final sample grid): the embedded default (its image_encoder/; the random default has
    none: add --config.method.image_encoder=PATH, any CLIPVisionModelWithProjection folder) with
    the bundled example subject's 4 images, object templates as captions, each image
    conditioning its own reconstruction.
  persona-jax train --config configs/ip_adapter.py --workdir runs/ip_sd15 \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/pairs \\
      --config.method.image_encoder=/path/to/clip-vit-h-14
    The paper's recipe: image-text pairs (captions as NAME.txt or metadata.jsonl), 512px center
    crops, AdamW lr 1e-4 constant, weight decay 0.01, batch 64 (8 x 8), condition drops 0.05
    each (image only, text only, both), 1M steps. `--config.method.kind=plus` trains the
    resampler on the penultimate layer's patch features instead; `method.pretrained=FILE`
    continues from an official IP-Adapter file.

Writes WORKDIR/ip_adapter.safetensors in the official layout (diffusers' `load_ip_adapter`,
`persona-jax sample --ip-adapter`).
"""

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(
      name="ip_adapter", kind="basic", num_tokens=0, heads=0, depth=4, image_encoder="",
      drop_image=0.05, drop_text=0.05, drop_both=0.05, pretrained="", allow_pickle=False))
  c.data = ConfigDict(dict(instance_dir="" if tiny else "/path/to/image_text_pairs",
                           caption_source="templates" if tiny else "files",
                           prompt="ball" if tiny else "", templates="object",
                           resolution=32 if tiny else 512, center_crop=True, random_flip=0.0,
                           random_zoom=1.0, num_images=0, caption_dropout=0.0))
  c.optim = ConfigDict(dict(lr=1e-3 if tiny else 1e-4, scale_lr=False, schedule="constant",
                            warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                            clip_grad_norm=1.0, grad_accum=1, groups=(), ema_decay=0.0))
  c.steps = 20 if tiny else 1000000
  c.batch_size = 4 if tiny else 8
  c.seed = 0
  c.mixed_precision = "no" if tiny else "bf16"
  c.remat = "none"
  c.min_snr_gamma = 0.0
  c.offset_noise = 0.0
  c.fsdp = 1
  c.sharding = ()
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 10000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 10000
  c.sample_prompts = (("a photo of a ball", "a photo of a ball on grass") if tiny else
                      ("a photo of a ball", "a painting of a ball in the snow"))
  c.sample_negative_prompt = ""
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 7.5
  c.sample_images = 2
  c.sample_seed = 0
  return c
