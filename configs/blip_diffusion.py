"""BLIP-Diffusion training (persona_jax/methods/blip_diffusion_training.py; the recipe with its
sources: docs/blip_diffusion_training.md).

  persona-jax train --config blip_diffusion:tiny --workdir runs/bd
    Stage 2 on the toy world: the toy BLIP-Diffusion base (world/toy_blip_diffusion.py, written
    once into the cache from the shipped toy base), 64 training scenes with the subject on another
    background as the input, the scene as the target, "a {class} ...", subject dropped 15%;
    32px, batch 4, 20 steps. Then zero-shot:
  persona-jax sample --run runs/bd --image subject.png --subject-class ball --prompt "on grass"
  persona-jax train --config blip_diffusion:tiny_finetune --workdir runs/bd_ft \\
      [--config.model=runs/bd/model]
    Fine-tuning on the first held-out toy subject of class ball (4 reference scenes, "a ball"):
    the UNet and the subject embedding, 20 steps. Then `sample --run runs/bd_ft --prompt ...`
    (no --image).
  persona-jax train --config configs/blip_diffusion.py --workdir runs/bd_ft \\
      --config.model=/path/to/blipdiffusion --config.data.instance_dir=/path/to/dog \\
      --config.method.subject_class=dog
    LAVIS's subject fine-tuning (finetune-db-dog.yaml): constant lr 5e-6, AdamW wd 0.01, batch 3,
    40 steps (120-150 for harder subjects), 512px, fp16 there (bf16 here).
  persona-jax train --config blip_diffusion:pretrain --workdir runs/bd_stage2 \\
      --config.model=/path/to/blipdiffusion --config.data.source=pkg.module:your_source
    The paper's stage 2: constant lr 2e-6, batch 16, 500K steps, 512px; the data (OpenImages
    subjects matted onto random backgrounds) is yours, as a source of SubjectExamples
    (data/blip_diffusion.py) through methods/blip_diffusion_training.py's examples_source.
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny", "tiny_finetune", "pretrain")
TOY_PRETRAIN = "persona_jax.world.blip_diffusion_data:toy_pretraining_source"
TOY_SUBJECT = "persona_jax.world.blip_diffusion_data:toy_subject_source"


def toy_model() -> str:
  from persona_jax.world.toy_blip_diffusion import toy_blip_diffusion_dir
  return str(toy_blip_diffusion_dir())


def get_config(arg=None):
  tiny = arg in ("tiny", "tiny_finetune")
  pretrain = arg in ("tiny", "pretrain")
  c = base_config("blip_diffusion")
  c.model = toy_model() if tiny else "/path/to/blipdiffusion"
  c.method.stage = "pretrain" if pretrain else "finetune"
  c.method.subject_class = "" if pretrain else ("ball" if tiny else "dog")
  if tiny:
    c.data.source = TOY_PRETRAIN if pretrain else TOY_SUBJECT
    c.data.num_images = 64 if pretrain else 4
  elif pretrain:
    c.data.source = "your_package.your_module:your_source"
  else:
    c.data.source = "blip_diffusion"
    c.data.instance_dir = "/path/to/subject"
  c.data.resolution = 32 if tiny else 512
  c.data.random_flip = 0.0
  c.optim.lr = (1e-4 if pretrain else 5e-5) if tiny else (2e-6 if pretrain else 5e-6)
  c.optim.weight_decay = 0.05 if pretrain else 0.01
  c.steps = 20 if tiny else (500000 if pretrain else 40)
  c.batch_size = 4 if tiny else (16 if pretrain else 3)
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else (5000 if pretrain else 40)
  c.keep_checkpoints = 2
  return c
