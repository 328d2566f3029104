"""FastComposer: tuning-free multi-subject generation; a fuse MLP merges each subject's image
embedding into its noun's text-encoder output, with a cross-attention localization loss and
delayed subject conditioning at sampling (Xiao et al. 2023; methods.md 8).

  persona-jax train --config fastcomposer:tiny --workdir runs/fc
    ~1 minute on 2 CPU cores: 20 steps on the embedded default (its image_encoder/) with
    toy-world scenes (caption with `<|image|>` after the class word, coverage as the mask);
    `fastcomposer:tiny_light` trains the light variant (fuse MLP + UNet LoRA).
  persona-jax train --config configs/fastcomposer.py --workdir runs/fc \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/folder \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14
    The reference's recipe (mit-han-lab/fastcomposer scripts/run_training.sh): the whole UNet,
    the fuse MLP and the image encoder's last 2 layers; lr 1e-5, batch 128, 150,000 steps, bf16,
    AdamW (0.9, 0.999, wd 1e-2), grad norm 1.0, localization loss weight 1e-3 on the middle 5
    blocks, masked denoising loss for half the examples, 10% unconditioned captions.
    The folder: images, metadata.jsonl with `<|image|>`-marked captions and per-subject masks
    (persona_jax/data/fastcomposer.py).

Writes WORKDIR/fastcomposer.safetensors; sample with
  persona-jax sample --fastcomposer runs/fc --image ball.png --prompt "a ball <|image|> on grass"
"""

from persona_jax.methods.fastcomposer import TOY_SOURCE
from persona_jax.train.config import base_config

VARIANTS = ("tiny", "tiny_light")


def get_config(arg=None):
  tiny = arg in ("tiny", "tiny_light")
  c = base_config("fastcomposer")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.method.variant = "light" if arg == "tiny_light" else "full"
  c.method.max_subjects = 2 if tiny else 4
  c.method.start_merge_step = 2 if tiny else 10
  # The tiny variants' data: toy-world scenes (persona_jax/world/fastcomposer_data.py).
  c.data.source = TOY_SOURCE if tiny else "fastcomposer"
  c.data.instance_dir = "" if tiny else "/path/to/fastcomposer_folder"
  c.data.resolution = 32 if tiny else 512
  c.data.random_flip = 0.0
  c.data.num_images = 16 if tiny else 0
  c.optim.lr = 1e-4 if tiny else 1e-5
  c.steps = 20 if tiny else 150000
  c.batch_size = 4 if tiny else 128
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 5000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 5000
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 5.0
  return c
