"""PhotoMaker v1 / v2 training on an SDXL base: the ID encoder's visual_projection_2 (v2: the
QFormerPerceiver over each ID image's face embedding) and fuse module and a UNet LoRA, each
example a person's image conditioned on 1..4 other images of the same person (Li et al. 2024;
persona_jax/methods/photomaker.py).

  persona-jax train --config photomaker:tiny --workdir runs/pm [--config.method.version=v2]
    The toy SDXL base (toy-xl) with the shipped toy base's CLIP image encoder (toy-xl ships
    none): 8 toy-world identities x 4 scenes (persona_jax/world/photomaker_data.py; v2: with the
    toy identity encoder's face embeddings), 32px, LoRA rank 8, 20 steps. Then:
  persona-jax sample --run runs/pm --image A.png --image B.png \\
      --prompt "a photo of a ball img on grass" --out out/   [v2: --face-analysis toy]
  persona-jax train --config configs/photomaker.py --workdir runs/pm_sdxl \\
      --config.model=/path/to/stable-diffusion-xl-base-1.0 \\
      --config.data.instance_dir=/path/to/identities \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14
    identities/<person>/*.png with NAME.txt captions holding the class word followed by the
    trigger word ("a photo of a man img ..."; data/photomaker.py); the paper's batch and rate
    are not released: ours below are a start (bf16, lr 1e-5, LoRA rank 64 as the official file).
    v2: --config.method.version=v2 --config.method.face_analysis=/path/to/buffalo_l (the
    insightface pack that embeds every photo's face, as the official v2 pipeline does).

Writes WORKDIR/photomaker.safetensors in the official flattened layout (id_encoder.*,
lora_weights.*), which `sample --photomaker` and the official pipeline read.
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)
TOY_SOURCE = "persona_jax.world.photomaker_data:toy_source"


def toy_image_encoder() -> str:
  """The shipped toy SD base's CLIP image encoder folder ("" when the toy base is not shipped:
  then set method.image_encoder)."""
  from persona_jax.default_model import is_toy_base_shipped, shipped_base_dir
  return str(shipped_base_dir() / "image_encoder") if is_toy_base_shipped() else ""


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("photomaker")
  c.model = "toy-xl" if tiny else "/path/to/stable-diffusion-xl-base-1.0"
  c.method.image_encoder = toy_image_encoder() if tiny else "/path/to/clip-vit-large-patch14"
  c.method.rank = 8 if tiny else 64
  c.data.source = TOY_SOURCE if tiny else "photomaker"
  c.data.instance_dir = "" if tiny else "/path/to/identities"
  c.data.resolution = 32 if tiny else 1024
  c.data.random_flip = 0.0 if tiny else 0.5
  c.data.num_images = 8 if tiny else 0
  c.optim.lr = 1e-4 if tiny else 1e-5
  c.steps = 20 if tiny else 100000
  c.batch_size = 4 if tiny else 48
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 5000
  c.keep_checkpoints = 2
  return c
