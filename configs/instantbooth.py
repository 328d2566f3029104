"""InstantBooth: a concept encoder (one token at the identifier) and a patch encoder feeding
gated self-attention adapters, trained on image-caption pairs of a class with the base model
frozen; a new subject then needs no tuning, only its images (Shi et al. 2023).

  persona-jax train --config instantbooth:tiny --workdir runs/ib
    ~1 minute on 2 CPU cores (36 s measured): 30 steps on the embedded default (its
    image_encoder/; the random default has none: add --config.method.image_encoder=PATH, any
    CLIPVisionModel folder) with the bundled example subject's 4 images captioned "a photo of a
    sks ball" (templates). Toy-world pairs with captions and masks for a real run:
    `python scripts/make_instantbooth_data.py runs/ib_data --images 2000`, then
    --config.data.instance_dir=runs/ib_data --config.data.caption_source=files.
  persona-jax train --config configs/instantbooth.py --workdir runs/ib_cats \\
      --config.model=/path/to/stable-diffusion-v1-4 --config.data.instance_dir=/path/to/cats \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14
    The paper's recipe: image-caption pairs of one class (captions with the identifier before
    the class noun, NAME.txt or metadata.jsonl; subject masks NAME.mask.png, optional), each
    image conditioning its own reconstruction; batch 16, lr 1e-4 for the two linear layers and
    1e-6 for the adapters, 200k (cats) to 320k (people) steps.
  persona-jax sample --instantbooth runs/ib --image A.png --image B.png \\
      --prompt "a photo of sks ball on the beach" --beta 0.3 --alpha 0.4 --out out

Writes WORKDIR/instantbooth.safetensors (the linear layers and the adapters).
"""

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-4"
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(
      name="instantbooth", identifier="sks", image_encoder="", concept_token=True,
      patch_tokens=True, beta=0.3, alpha=0.4, encoder_lr=1e-3 if tiny else 1e-4,
      adapter_lr=1e-4 if tiny else 1e-6, crop_scale=0.8, rotation=10.0, flip=0.5))
  c.data = ConfigDict(dict(instance_dir="" if tiny else "/path/to/captioned_images",
                           caption_source="templates" if tiny else "files",
                           prompt="sks ball" if tiny else "", templates="object",
                           resolution=32 if tiny else 512, center_crop=True, random_flip=0.5,
                           random_zoom=1.0, num_images=0, caption_dropout=0.0))
  c.optim = ConfigDict(dict(lr=1e-3 if tiny else 1e-4, scale_lr=False, schedule="constant",
                            warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                            clip_grad_norm=1.0, grad_accum=1, groups=(), ema_decay=0.0))
  c.steps = 30 if tiny else 320000
  c.batch_size = 4 if tiny else 16
  c.seed = 0
  c.mixed_precision = "no" if tiny else "bf16"
  c.remat = "none"
  c.min_snr_gamma = 0.0
  c.offset_noise = 0.0
  c.fsdp = 1
  c.sharding = ()
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 5000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 5000
  c.sample_prompts = ("a photo of a sks ball", "a photo of a sks ball on grass")
  c.sample_negative_prompt = ""
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 7.5
  c.sample_images = 2
  c.sample_seed = 0
  return c
