"""Pivotal tuning: new token rows and a UNet LoRA trained together, the rows stopping half-way
(diffusers' train_dreambooth_lora_sd15_advanced.py with --train_text_encoder_ti).

  persona-jax train --config pivotal:tiny --workdir runs/pivotal
    ~1 minute on 2 CPU cores: 2 rows for <s0> from "ball" and rank 4 on the embedded default's
    attention q/k/v/out, 40 steps on the bundled example subject; the rows stop at step 20.
  persona-jax train --config configs/pivotal.py --workdir runs/pivotal \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/images
    The script's defaults: 2 new tokens (<s0>, <s0>_1: the prompt says <s0>), rank 4 (alpha 4)
    on to_q/to_k/to_v/to_out.0, lr 1e-4 constant, weight decay 1e-4, clipping 1.0, batch 4;
    the rows at 5e-4 (Textual Inversion's diffusers lr; the script's --text_encoder_lr default
    5e-6 is for text-encoder weights and its README trains the rows with Prodigy) until half
    the steps (--train_text_encoder_ti_frac 0.5): optim.lr_groups = (("tokens(_2)?", 5e-4,
    0.5),) (tokens_2: the rows in SDXL's second text encoder; --config.model=an SDXL folder trains
    train_dreambooth_lora_sdxl_advanced.py's recipe). 1000 steps, "a photo of <s0>". LoRA on the
    text encoder too: --config.method.text_encoder=True.

Writes WORKDIR/learned_embeds.safetensors and WORKDIR/lora.safetensors; `persona-jax export
WORKDIR --format kohya` gives the webui's LoRA and embedding, `--format diffusers` diffusers'.
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("pivotal")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.method.initializer = "ball" if tiny else "toy"
  c.data.instance_dir = "" if tiny else "/path/to/images"
  c.data.caption_source = "prompt"
  c.data.prompt = "a photo of a <s0>" if tiny else "a photo of <s0>"
  c.data.resolution = 32 if tiny else 512
  c.optim.lr = 1e-3 if tiny else 1e-4
  c.optim.lr_groups = (("tokens(_2)?", 5e-3 if tiny else 5e-4, 0.5),)
  c.optim.weight_decay = 1e-4
  c.steps = 40 if tiny else 1000
  c.batch_size = 2 if tiny else 4
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 50
  c.checkpoint_every = 10 if tiny else 250
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 250
  c.sample_prompts = (("a photo of a <s0>", "a photo of a <s0> on grass") if tiny else
                      ("a photo of <s0>", "a photo of <s0> in the snow"))
  c.sample_steps = 10 if tiny else 50
  return c
