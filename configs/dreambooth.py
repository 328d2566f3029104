"""DreamBooth with class-prior preservation: fine-tune the UNet (and optionally the text encoder)
on a few images of a subject (Ruiz et al. 2022).

  persona-jax train --config dreambooth:tiny --workdir runs/db
    ~2 minutes on 2 CPU cores: 8 class images of "a photo of a ball" sampled from the embedded
    default (the toy-world base), then 150 steps of 4 + 4 rows on the bundled example subject (a
    pink ball with yellow dots, a look the base never saw); the samples show it.
  persona-jax train --config configs/dreambooth.py --workdir runs/db \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/dog \\
      --config.data.prompt="a photo of sks dog" --config.data.class_prompt="a photo of dog"
    The diffusers README recipe: lr 5e-6, batch 1 (+1 class image), 800 steps, 200 class images
    (generated into WORKDIR/class_images unless data.class_dir holds them), prior weight 1.
    Add --config.method.train_text_encoder=True --config.method.text_encoder_lr=2e-6 to train
    the text encoder too. On a TPU/GPU host with N devices, --config.fsdp=N shards the UNet and
    its AdamW moments over them; --config.remat=blocks and mixed_precision=bf16 (the default
    here) save memory.

Writes WORKDIR/model: a diffusers folder with the fine-tuned weights.
"""

from ml_collections import ConfigDict


def get_config(arg=None):
  tiny = arg == "tiny"
  c = ConfigDict()
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.model_config = ""       # a single-file model: a diffusers folder of its family (head counts)
  c.prediction_type = ""    # ... or, without one: epsilon | v_prediction
  c.method = ConfigDict(dict(name="dreambooth", train_text_encoder=False, text_encoder_lr=0.0,
                             prior_loss_weight=1.0))
  c.data = ConfigDict(dict(
      instance_dir="" if tiny else "/path/to/images", caption_source="prompt",
      prompt="a photo of a sks ball" if tiny else "a photo of sks toy", templates="object",
      resolution=32 if tiny else 512,
      center_crop=True, random_flip=0.5, caption_dropout=0.0,
      num_class_images=8 if tiny else 200, class_dir="",
      class_prompt="a photo of a ball" if tiny else "a photo of toy",
      class_generate=True, class_sample_steps=25 if tiny else 50,
      class_guidance=4.0 if tiny else 7.5,
      class_negative_prompt=""))
  c.optim = ConfigDict(dict(lr=2e-4 if tiny else 5e-6, scale_lr=False, schedule="constant",
                            warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                            clip_grad_norm=1.0, grad_accum=1, groups=(), ema_decay=0.0))
  c.steps = 150 if tiny else 800
  c.batch_size = 4 if tiny else 1
  c.seed = 0
  c.mixed_precision = "no" if tiny else "bf16"
  c.remat = "none"
  c.min_snr_gamma = 0.0
  c.offset_noise = 0.0
  c.fsdp = 1
  # With fsdp > 1 the UNet, the text encoder and their optimizer state are sharded over it.
  c.sharding = (("unet/.*", "fsdp"), ("text_encoder/.*", "fsdp"))
  c.log_every = 10 if tiny else 50
  c.checkpoint_every = 50 if tiny else 200
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 200
  c.sample_prompts = (("a photo of a sks ball", "a photo of a sks ball on grass") if tiny else
                      ("a photo of sks toy", "a photo of sks toy in the snow"))
  c.sample_negative_prompt = ""
  c.sample_steps = 25 if tiny else 50
  c.sample_guidance = 4.0 if tiny else 7.5
  c.sample_images = 4 if tiny else 2
  c.sample_seed = 0
  return c
