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

from persona_jax.methods.instantbooth import ADAPTER_LEAVES
from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("instantbooth")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-4"
  c.data.instance_dir = "" if tiny else "/path/to/captioned_images"
  c.data.caption_source = "templates" if tiny else "files"
  c.data.prompt = "sks ball" if tiny else ""
  c.data.resolution = 32 if tiny else 512
  # The paper's learning rates: 1e-4 for the concept and patch encoders, 1e-6 for the adapters.
  c.optim.lr = 1e-3 if tiny else 1e-4
  c.optim.lr_groups = ((ADAPTER_LEAVES, 1e-4 if tiny else 1e-6),)
  c.steps = 30 if tiny else 320000
  c.batch_size = 4 if tiny else 16
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 5000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 5000
  c.sample_prompts = ("a photo of a sks ball", "a photo of a sks ball on grass")
  c.sample_steps = 10 if tiny else 50
  return c
