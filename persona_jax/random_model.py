"""Small random-weight SD pipelines in the exact diffusers layout (`persona-jax make-random-model`).

Presets mirror the two families persona_jax supports at toy width:
  * `sd1`: conv proj_in/out, one head count for every block, quick_gelu CLIP, EOS padding,
    epsilon prediction;
  * `sd2`: linear proj_in/out, per-block head counts, upcast attention, two transformer layers
    in the lower block, gelu CLIP, "!" padding (id 0), v-prediction;
  * `sdxl`: SDXL's layout (StableDiffusionXLPipeline): a first level without attention, linear
    projections, per-level head counts and depths, both text encoders (quick-gelu CLIP, then a
    gelu CLIPTextModelWithProjection with "!" padding) concatenated into the cross-attention
    width, text_time added conditioning, the SDXL VAE scaling factor, an Euler scheduler config.
Every weight is drawn with numpy from a seed (norm scales and biases too, so parity tests see
non-trivial affine params); nothing is compiled.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from persona_jax.convert.diffusers_folder import (DIFFUSERS_VERSION, Pipeline, components_of,
                                                  model_index, parse_configs)
from persona_jax.models.components import abstract_params
from persona_jax.pipeline import save_pipeline
from persona_jax.tokenizer import shipped_tokenizer_dir, write_tokenizer

PRESETS = ("sd1", "sd2", "sdxl")


def preset_configs(preset: str = "sd1") -> dict:
  """Raw JSON configs (as diffusers/transformers write them) of a small pipeline."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
  sd2 = preset == "sd2"
  unet = {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": 16, "in_channels": 4, "out_channels": 4,
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
      "block_out_channels": [32, 64], "layers_per_block": 2, "norm_num_groups": 8,
      "cross_attention_dim": 32,
      "attention_head_dim": [2, 4] if sd2 else 2,
      "use_linear_projection": sd2, "upcast_attention": sd2,
      "transformer_layers_per_block": [2, 1] if sd2 else 1,
      "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
  }
  vae = {
      "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": 3, "out_channels": 3, "latent_channels": 4,
      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
      "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
      "act_fn": "silu", "sample_size": 32, "scaling_factor": 0.18215, "force_upcast": True,
  }
  text_encoder = {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
      "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
      "hidden_act": "gelu" if sd2 else "quick_gelu", "layer_norm_eps": 1e-5,
      "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0 if sd2 else 49407,
      "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
  }
  scheduler = {
      "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
      "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
      "steps_offset": 1, "prediction_type": "v_prediction" if sd2 else "epsilon",
      "timestep_spacing": "leading",
  }
  if preset == "sdxl":
    return _sdxl_configs(unet, vae, text_encoder, scheduler)
  return {"model_index": model_index(), "unet": unet, "vae": vae, "text_encoder": text_encoder,
          "scheduler": scheduler}


def _sdxl_configs(unet: dict, vae: dict, text_encoder: dict, scheduler: dict) -> dict:
  """The sdxl preset: SD 1.x's pieces reshaped as stable-diffusion-xl-base-1.0 is, at toy width
  (the second text encoder wider than the first, as 1280 vs 768: diffusers' single-file loader
  tells the two apart by width)."""
  text_encoder_2 = dict(text_encoder, architectures=["CLIPTextModelWithProjection"],
                        hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=2, projection_dim=24, hidden_act="gelu",
                        pad_token_id=0)
  unet = dict(unet, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
              transformer_layers_per_block=[1, 2], use_linear_projection=True,
              cross_attention_dim=text_encoder["hidden_size"] + text_encoder_2["hidden_size"],
              addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=text_encoder_2["projection_dim"] + 6 * 8,
              num_attention_heads=None)
  vae = dict(vae, scaling_factor=0.13025, force_upcast=True)
  scheduler = dict(scheduler, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                   use_karras_sigmas=False, skip_prk_steps=True, sample_max_value=1.0,
                   trained_betas=None)
  return {"model_index": model_index("EulerDiscreteScheduler", sdxl=True), "unet": unet,
          "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
          "scheduler": scheduler}


def random_params(abstract, rng: np.random.Generator, dtype=np.float32):
  """Random values for an abstract param tree: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5^2),
  norm scales ~ U(0.5, 1.5), biases ~ N(0, 0.1^2)."""
  out = {}
  for path, leaf in sorted(flatten_dict(abstract).items()):
    shape, name = tuple(leaf.shape), path[-1]
    if name == "kernel":
      w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "embedding":
      w = 0.5 * rng.standard_normal(shape)
    elif name == "scale":
      w = rng.uniform(0.5, 1.5, shape)
    elif name == "bias":
      w = 0.1 * rng.standard_normal(shape)
    else:
      raise ValueError(f"no random rule for param {'/'.join(path)}")
    out[path] = w.astype(dtype)
  return unflatten_dict(out)


def random_pipeline(preset: str = "sd1", seed: int = 0, *, dtype=jnp.float32,
                    tokenizer_dir: Path | None = None, tokenizer_2_dir: Path | None = None,
                    attention: str = "auto") -> Pipeline:
  """An in-memory random pipeline of a preset (its tokenizer folders must exist on disk)."""
  raw = preset_configs(preset)
  configs = parse_configs(raw, dtype=dtype, attention=attention)
  rng = np.random.default_rng(seed)
  params = {c.name: random_params(abstract_params(c.name, configs[f"{c.name}_config"]), rng)
            for c in components_of(raw)}
  params = jax.device_put(jax.tree.map(lambda x: x.astype(dtype), params))
  tokenizer_dir = tokenizer_dir or shipped_tokenizer_dir()
  return Pipeline(**configs, params=params, tokenizer_dir=tokenizer_dir, raw_configs=raw,
                  tokenizer_2_dir=tokenizer_2_dir or tokenizer_dir if preset == "sdxl" else None)


def make_random_model(out, preset: str = "sd1", seed: int = 0, overwrite: bool = False) -> Path:
  """Writes a random pipeline of `preset` as a diffusers folder at `out`."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    tok = write_tokenizer(Path(tmp) / "tokenizer", "sd1" if preset == "sdxl" else preset)
    tok_2 = write_tokenizer(Path(tmp) / "tokenizer_2", "sd2") if preset == "sdxl" else None
    pipe = random_pipeline(preset, seed, tokenizer_dir=tok, tokenizer_2_dir=tok_2)
    return save_pipeline(pipe, out, overwrite=overwrite)
