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
    Add --config.method.train_text_encoder=True --config.optim.lr_groups='(("text_encoder/.*",
    2e-6),)' to train the text encoder too, at its own learning rate. On a TPU/GPU host with N devices, --config.fsdp=N shards the UNet and
    its AdamW moments over them; --config.remat=blocks and mixed_precision=bf16 (the default
    here) save memory.

Writes WORKDIR/model: a diffusers folder with the fine-tuned weights.
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("dreambooth")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.data.instance_dir = "" if tiny else "/path/to/images"
  c.data.caption_source = "prompt"
  c.data.prompt = "a photo of a sks ball" if tiny else "a photo of sks toy"
  c.data.resolution = 32 if tiny else 512
  c.data.num_class_images = 8 if tiny else 200
  c.data.class_prompt = "a photo of a ball" if tiny else "a photo of toy"
  c.data.class_sample_steps = 25 if tiny else 50
  c.data.class_guidance = 4.0 if tiny else 7.5
  c.optim.lr = 2e-4 if tiny else 5e-6
  c.steps = 150 if tiny else 800
  c.batch_size = 4 if tiny else 1
  c.mixed_precision = "no" if tiny else "bf16"
  # With fsdp > 1 the UNet, the text encoder and their optimizer state are sharded over it.
  c.sharding = (("unet/.*", "fsdp"), ("text_encoder/.*", "fsdp"))
  c.log_every = 10 if tiny else 50
  c.checkpoint_every = 50 if tiny else 200
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 200
  c.sample_prompts = (("a photo of a sks ball", "a photo of a sks ball on grass") if tiny else
                      ("a photo of sks toy", "a photo of sks toy in the snow"))
  c.sample_steps = 25 if tiny else 50
  c.sample_guidance = 4.0 if tiny else 7.5
  c.sample_images = 4 if tiny else 2
  return c
