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
    crops, AdamW lr 1e-4 constant, weight decay 0.01, a global batch of 64 (the paper's 8 GPUs
    x tutorial_train.py's --train_batch_size 8; `batch_size` counts rows over all devices),
    condition drops 0.05 each (image only, text only, both), 1M steps. `--config.method.kind=plus` trains the
    resampler on the penultimate layer's patch features instead; `method.pretrained=FILE`
    continues from an official IP-Adapter file.

Writes WORKDIR/ip_adapter.safetensors in the official layout (diffusers' `load_ip_adapter`,
`persona-jax sample --ip-adapter`).
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("ip_adapter")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.data.instance_dir = "" if tiny else "/path/to/image_text_pairs"
  c.data.caption_source = "templates" if tiny else "files"
  c.data.prompt = "ball" if tiny else ""
  c.data.resolution = 32 if tiny else 512
  c.data.random_flip = 0.0
  c.optim.lr = 1e-3 if tiny else 1e-4
  c.steps = 20 if tiny else 1000000
  c.batch_size = 4 if tiny else 64
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 10000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 10000
  c.sample_prompts = (("a photo of a ball", "a photo of a ball on grass") if tiny else
                      ("a photo of a ball", "a painting of a ball in the snow"))
  c.sample_steps = 10 if tiny else 50
  return c
