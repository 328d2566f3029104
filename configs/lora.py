"""Block-wise LoRA / LoCon: low-rank factors merged into the UNet's (and optionally the text
encoder's) weights, trained on a few images of a subject.

  persona-jax train --config lora:tiny --workdir runs/lora
    ~1 minute on 2 CPU cores: rank 4 on the attention q/k/v/out of the embedded default's UNet,
    30 steps on the bundled example subject.
  persona-jax train --config configs/lora.py --workdir runs/lora \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/images
    diffusers' train_dreambooth_lora.py recipe: rank 4, alpha 4 on the UNet's attention
    to_q/to_k/to_v/to_out.0 (its target_modules), lr 1e-4, 500 steps, batch 1, "a photo of sks
    toy".
  persona-jax train --config lora:kohya ...
    The same recipe on kohya's wider set (networks/lora.py): every Linear and 1x1 conv of the
    transformers (attention, feed-forward, proj_in/out: `method.targets=("kohya",)`) plus LoCon
    on the resnet and sampler convs at rank 4 (`method.conv_rank`). In any config, per-block
    ranks: --config.method.block_ranks='{"IN01": 8, "OUT11": 0}' (block names IN00..OUT11,
    MID, BASE; rank 0 skips a block).
  persona-jax train --config lora:blocks=MIDD --workdir runs/lora ...
    The same recipe with factors only in the blocks of one of sd-webui-lora-block-weight's
    17-block presets (ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL; methods.md 4.2), i.e.
    block-wise LoRA; in any config: --config.method.blocks=MIDD, or 17 / 26 numbers
    ("1,0,0,...": 0 skips a block). SD 1.x/2.x block layout; on SDXL (IN00..IN08, MID,
    OUT00..OUT08) the extension's 12 or 20 numbers, the named presets being SD 1.x/2.x's.
  Variants, in any config: --config.method.variant=dora (PEFT's use_dora: a magnitude per output
    feature beside the LoRA factors), lokr or loha (LyCORIS's Kronecker and Hadamard products;
    LoKr's own knobs: --config.method.factor=-1 (the most balanced split of each dimension, or
    the largest part <= factor), --config.method.decompose_both=True (the smaller Kronecker half
    low rank too), --config.method.full_matrix=True (both halves full, alpha unused)). rank,
    alpha, conv_rank, targets and blocks mean the same for every variant. Exports: DoRA to both
    formats, LoKr/LoHa to kohya (the LyCORIS keys ComfyUI, A1111 and LyCORIS read).
  On SDXL: --config.model=/path/to/stable-diffusion-xl-base-1.0; --config.method.text_encoder=True
    trains LoRA on both text encoders (train_dreambooth_lora_sdxl.py's --train_text_encoder).

Writes WORKDIR/lora.safetensors (the factors by param path); `persona-jax export --format
diffusers|kohya` writes the files diffusers' `load_lora_weights` and A1111/ComfyUI read.
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny", "kohya", "blocks=PRESET")


def get_config(arg=None):
  tiny = arg == "tiny"
  blocks = arg.split("=", 1)[1] if arg and arg.startswith("blocks=") else ""
  if arg and not tiny and not blocks and arg != "kohya":
    raise ValueError(f"lora config variant '{arg}': use 'tiny', 'kohya' or 'blocks=PRESET' (e.g. MIDD)")
  c = base_config("lora")
  if arg == "kohya":
    c.method.targets = ("kohya",)
    c.method.conv_rank = 4
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  # One uniform rank in the tiny variant: block names depend on the UNet's shape.
  c.method.blocks = blocks
  c.data.instance_dir = "" if tiny else "/path/to/images"
  c.data.caption_source = "prompt"
  c.data.prompt = "a photo of a sks ball" if tiny else "a photo of sks toy"
  c.data.resolution = 32 if tiny else 512
  c.optim.lr = 1e-3 if tiny else 1e-4
  c.steps = 30 if tiny else 500
  c.batch_size = 2 if tiny else 1
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 50
  c.checkpoint_every = 10 if tiny else 250
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 250
  c.sample_prompts = (("a photo of a sks ball", "a photo of a sks ball on grass") if tiny else
                      ("a photo of sks toy", "a photo of sks toy in the snow"))
  c.sample_steps = 10 if tiny else 50
  return c
