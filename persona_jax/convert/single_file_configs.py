"""What a single-file SD checkpoint is: its family from its keys (SD 1.x's CLIP or SD 2.x's
OpenCLIP text encoder; SDXL and other models refused), and, for a standard SD 1.x / 2.x file
loaded without a config folder, the diffusers configs inferred from its tensor shapes and the
family (formats.md 1.2-1.5). convert/single_file.py reads and writes the files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from persona_jax.convert.diffusers_folder import DIFFUSERS_VERSION, model_index
from persona_jax.errors import ConfigError, ModelFileError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_PREFIX_ALT = "vae."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."     # SD 1.x
CLIP_PREFIX_SHORT = "cond_stage_model.transformer."           # older transformers: no text_model.
OPENCLIP_PREFIX = "cond_stage_model.model."                   # SD 2.x

# What a standard SD 1.x / 2.x single file leaves out, for `infer_configs` (formats.md 1.2-1.5).
SD_UNET_WIDTHS = (320, 640, 1280, 1280)
SD_VAE_SCALING = 0.18215


def file_text_format(tensors: Mapping, source: str) -> str:
  """'clip' (SD 1.x) or 'openclip' (SD 2.x) from the file's keys; errors for other models."""
  keys = tensors.keys()
  if not any(k.startswith(UNET_PREFIX) for k in keys):
    if any(k.startswith("conditioner.embedders.") for k in keys):
      raise ModelFileError(f"{source}: an SDXL checkpoint; persona_jax supports SD 1.x and 2.x")
    raise ModelFileError(f"{source}: not a Stable Diffusion single-file checkpoint (no "
                         f"'{UNET_PREFIX}*' tensors)")
  if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
    return "openclip"
  if any(k.startswith(CLIP_PREFIX_SHORT) for k in keys):
    return "clip"
  raise ModelFileError(f"{source}: no text encoder ('{CLIP_PREFIX}*' for SD 1.x or "
                       f"'{OPENCLIP_PREFIX}*' for SD 2.x)")


def _keys_by_index(keys, pattern: str) -> dict[int, list[str]]:
  out: dict[int, list[str]] = {}
  for k in keys:
    m = re.match(pattern, k)
    if m:
      out.setdefault(int(m[1]), []).append(k)
  return dict(sorted(out.items()))


def infer_configs(tensors: Mapping, prediction_type: str, *, source: str = "single file") -> dict:
  """Raw diffusers configs (model_index, unet, text_encoder, vae, scheduler) of a standard SD 1.x
  or 2.x single file. Widths, depths and block types come from the tensor shapes; what a file
  does not record comes from the family: SD 1.x 8 heads per UNet block, SD 2.x head dim 64; the
  DDIM schedule SD was trained with; sample size 64 (96 for SD 2.x v-prediction, as 2.1-768).
  Only `.shape` of the tensors is read.

  Raises:
    ConfigError when the widths are not SD's (then head counts cannot be known): pass a config
    folder.
  """
  from persona_jax.diffusion.schedules import PREDICTION_TYPES
  if prediction_type not in PREDICTION_TYPES:
    raise ConfigError(f"prediction_type '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")
  fmt = file_text_format(tensors, source)
  sd2 = fmt == "openclip"
  shape = {k: tuple(np.shape(v)) for k, v in tensors.items()}
  u = UNET_PREFIX
  conv_in = shape.get(f"{u}input_blocks.0.0.weight")
  if conv_in is None:
    raise ModelFileError(f"{source}: no '{u}input_blocks.0.0.weight'")
  inputs = _keys_by_index(shape, rf"^{re.escape(u)}input_blocks\.(\d+)\.")
  blocks, current = [], []
  for i, keys in inputs.items():
    if i == 0:
      continue
    if f"{u}input_blocks.{i}.0.op.weight" in shape:
      blocks.append(current)
      current = []
    else:
      current.append((i, any(k.startswith(f"{u}input_blocks.{i}.1.") for k in keys)))
  blocks.append(current)
  widths = tuple(shape[f"{u}input_blocks.{b[0][0]}.0.out_layers.3.weight"][0] for b in blocks)
  if widths != SD_UNET_WIDTHS:
    raise ConfigError(
        f"{source}: UNet block widths {widths} are not SD 1.x/2.x's {SD_UNET_WIDTHS}, so its "
        "attention head counts cannot be inferred; pass config_dir= (--config DIR), a diffusers "
        "folder of the same architecture")
  attn = [all(a for _, a in b) for b in blocks]
  depths = []
  for b, has_attn in zip(blocks, attn):
    if has_attn:
      first = f"{u}input_blocks.{b[0][0]}.1.transformer_blocks."
      depths.append(len({k[len(first):].split(".")[0] for k in shape if k.startswith(first)}))
    else:
      depths.append(1)
  attn_key = next(k for k in shape if k.endswith("attn2.to_k.weight"))
  proj_in = next(k for k in shape if k.startswith(u) and k.endswith("proj_in.weight"))
  layers = [len(b) for b in blocks]
  v = prediction_type == "v_prediction"
  unet = {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": 96 if sd2 and v else 64, "in_channels": conv_in[1],
      "out_channels": shape[f"{u}out.2.weight"][0],
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "block_out_channels": list(widths),
      "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
      "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
      "cross_attention_dim": shape[attn_key][1],
      "attention_head_dim": [w // 64 for w in widths] if sd2 else 8,
      "use_linear_projection": len(shape[proj_in]) == 2,
      "upcast_attention": sd2 and v,
      "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
      "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
  }
  if sd2:
    p = OPENCLIP_PREFIX
    resblocks = _keys_by_index(shape, rf"^{re.escape(p)}transformer\.resblocks\.(\d+)\.")
    n_layers = len(resblocks) - (1 if f"{p}text_projection" in shape else 0)
    token, position = shape[f"{p}token_embedding.weight"], shape[f"{p}positional_embedding"]
    intermediate = shape[f"{p}transformer.resblocks.0.mlp.c_fc.weight"][0]
    text_extra = {"hidden_act": "gelu", "projection_dim": 512}
  else:
    p = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in shape) else CLIP_PREFIX_SHORT
    n_layers = len(_keys_by_index(shape, rf"^{re.escape(p)}encoder\.layers\.(\d+)\."))
    token = shape[f"{p}embeddings.token_embedding.weight"]
    position = shape[f"{p}embeddings.position_embedding.weight"]
    intermediate = shape[f"{p}encoder.layers.0.mlp.fc1.weight"][0]
    text_extra = {"hidden_act": "quick_gelu", "projection_dim": 768}
  text_encoder = {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": token[0], "hidden_size": token[1], "intermediate_size": intermediate,
      "num_hidden_layers": n_layers, "num_attention_heads": token[1] // 64,
      "max_position_embeddings": position[0], "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
      "initializer_range": 0.02, "initializer_factor": 1.0, **text_extra,
      # The Hub's SD configs carry these legacy ids (eos 2: pool at the argmax id); only the
      # pooled output depends on them, and SD 1.x/2.x do not use it.
      "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
  }
  vae_keys = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in shape) else VAE_PREFIX_ALT
  down = _keys_by_index(shape, rf"^{re.escape(vae_keys)}encoder\.down\.(\d+)\.")
  vae_widths = [shape[f"{vae_keys}encoder.down.{i}.block.0.conv1.weight"][0] for i in down]
  vae_layers = len(_keys_by_index(shape, rf"^{re.escape(vae_keys)}encoder\.down\.0\.block\.(\d+)\."))
  vae = {
      "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": shape[f"{vae_keys}encoder.conv_in.weight"][1],
      "out_channels": shape[f"{vae_keys}decoder.conv_out.weight"][0],
      "latent_channels": shape[f"{vae_keys}decoder.conv_in.weight"][1],
      "down_block_types": ["DownEncoderBlock2D"] * len(vae_widths),
      "up_block_types": ["UpDecoderBlock2D"] * len(vae_widths),
      "block_out_channels": vae_widths, "layers_per_block": vae_layers, "norm_num_groups": 32,
      "act_fn": "silu", "sample_size": 768 if sd2 and v else 512, "scaling_factor": SD_VAE_SCALING,
      "force_upcast": True,
  }
  scheduler = {
      "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
      "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
      "steps_offset": 1, "prediction_type": prediction_type, "timestep_spacing": "leading",
  }
  return {"model_index": model_index(), "unet": unet, "text_encoder": text_encoder, "vae": vae,
          "scheduler": scheduler}


