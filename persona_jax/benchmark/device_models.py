"""The device benchmark's random-weight pipelines: SD 1.5's and SDXL base's real component
shapes (and a toy one for `--dry-run`), written as diffusers folders both frameworks load.

Shapes as runwayml/stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 publish them: the
UNets are the `bench` presets `sd15` and `sdxl_full`, the text encoders CLIP ViT-L/14's (and
OpenCLIP ViT-bigG/14's for SDXL's second), the VAE the 4-level 128..512 AutoencoderKL. The
scheduler is DDIM on SD's scaled-linear betas for every model (the same sampler on both sides).
Weights are `random_model.random_params` draws (in parallel over groups of leaves, each group
from its own seed), stored in float16 (half the bytes to write and read; each side casts to its
compute dtype).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODELS = ("tiny", "tiny_sdxl", "sd15", "sdxl")

_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, projection_dim=768,
               num_hidden_layers=12, num_attention_heads=12)
_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                  num_hidden_layers=32, num_attention_heads=20)
_DDIM = dict(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False,
             steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def model_configs(name: str) -> dict:
  """Raw JSON configs of a benchmark pipeline: `sd15`, `sdxl` (the real shapes), `tiny`,
  `tiny_sdxl` (make-random-model's sd1 and sdxl presets with one layer per block, for a dry run
  that compiles quickly)."""
  from persona_jax.benchmark import PRESETS
  from persona_jax.convert.diffusers_folder import model_index
  from persona_jax.random_model import preset_configs
  if name not in MODELS:
    raise ValueError(f"unknown benchmark model '{name}' (choose from {', '.join(MODELS)})")
  sdxl = name.endswith("sdxl")
  raw = preset_configs("sdxl" if sdxl else "sd1")
  if name.startswith("tiny"):
    raw["unet"]["layers_per_block"] = raw["vae"]["layers_per_block"] = 1
    for encoder in ("text_encoder", "text_encoder_2"):
      if encoder in raw:
        raw[encoder]["num_hidden_layers"] = 1
    return raw
  unet = PRESETS["sdxl_full" if sdxl else "sd15"].unet
  raw["unet"] = {k: v for k, v in raw["unet"].items() if k.startswith("_")} | unet
  # StableDiffusionPipeline decodes in the pipeline's half precision whatever the VAE config says
  # (only the SDXL pipeline upcasts), and our decoder follows force_upcast: the same work on both
  # sides.
  raw["vae"] = dict(raw["vae"], **_VAE, sample_size=1024 if sdxl else 512, force_upcast=sdxl)
  raw["text_encoder"] = dict(raw["text_encoder"], **_CLIP_L)
  if sdxl:
    raw["text_encoder_2"] = dict(raw["text_encoder_2"], **_CLIP_BIGG)
  raw["scheduler"] = {k: v for k, v in raw["scheduler"].items()
                      if k in ("_diffusers_version", "num_train_timesteps", "beta_start",
                               "beta_end", "beta_schedule")} | _DDIM
  raw["model_index"] = model_index("DDIMScheduler", sdxl=sdxl)
  return raw


def write_model(name: str, out: Path, seed: int = 0) -> Path:
  """Writes the random pipeline `name` as the diffusers folder `out` (float16 weights)."""
  import tempfile

  from persona_jax.convert.diffusers_folder import Pipeline, components_of, parse_configs
  from persona_jax.models.components import abstract_params
  from persona_jax.pipeline import save_pipeline
  from persona_jax.tokenizer import write_tokenizer
  raw = model_configs(name)
  configs = parse_configs(raw)
  params = {c.name: parallel_random_params(abstract_params(c.name, configs[f"{c.name}_config"]),
                                           (seed, i))
            for i, c in enumerate(components_of(raw))}
  with tempfile.TemporaryDirectory() as tmp:
    sdxl = "text_encoder_2" in raw
    tokenizer = write_tokenizer(Path(tmp) / "tokenizer", "sd1")
    tokenizer_2 = write_tokenizer(Path(tmp) / "tokenizer_2", "sd2") if sdxl else None
    pipe = Pipeline(**configs, params=params, tokenizer_dir=tokenizer, raw_configs=raw,
                    tokenizer_2_dir=tokenizer_2)
    return save_pipeline(pipe, out, overwrite=True)


def parallel_random_params(abstract, seed, groups: int | None = None) -> dict:
  """`random_params(abstract)` in float16, drawn by threads over `groups` groups of leaves of
  about equal size (numpy draws and casts without holding the GIL): SD 1.5's billion values
  take seconds on a many-core machine instead of a minute."""
  import os
  from concurrent.futures import ThreadPoolExecutor

  from flax.traverse_util import flatten_dict, unflatten_dict

  from persona_jax.random_model import random_params
  leaves = sorted(flatten_dict(abstract).items(), key=lambda kv: -int(np.prod(kv[1].shape)))
  groups = groups or os.cpu_count() or 1
  parts = [dict(leaves[g::groups]) for g in range(groups)]
  with ThreadPoolExecutor(groups) as pool:
    drawn = pool.map(lambda g: flatten_dict(random_params(
        unflatten_dict(parts[g]), np.random.default_rng([*seed, g]), np.float16)),
        [g for g in range(groups) if parts[g]])
    return unflatten_dict({path: value for part in drawn for path, value in part.items()})


def latent_size(folder: Path, size: int) -> int:
  """The latent side of `size`-pixel images under FOLDER's VAE (2^(levels - 1) smaller)."""
  import json
  levels = len(json.loads((Path(folder) / "vae" / "config.json").read_text())["block_out_channels"])
  return size // 2 ** (levels - 1)
