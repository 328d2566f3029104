"""What a single-file SD checkpoint is: its family from its keys (SD 1.x's CLIP, SD 2.x's
OpenCLIP, or SDXL's CLIP ViT-L + OpenCLIP ViT-bigG text encoders; the SDXL refiner and other
models refused), and, for a standard SD 1.x / 2.x / SDXL base file loaded without a config
folder, the diffusers configs inferred from its tensor shapes and the family (formats.md
1.2-1.5). convert/single_file.py reads and writes the files.
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
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."    # SDXL: CLIP ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."                 # SDXL: OpenCLIP ViT-bigG

# The families `file_family` tells apart, as error messages name them.
FAMILIES = {"clip": "SD 1.x (CLIP text encoder)", "openclip": "SD 2.x (OpenCLIP text encoder)",
            "sdxl": "SDXL (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)"}

# What a standard SD 1.x / 2.x / SDXL base file leaves out, for `infer_configs` (formats.md
# 1.2-1.5; SDXL: stable-diffusion-xl-base-1.0's configs).
SD_UNET_WIDTHS = (320, 640, 1280, 1280)
SD_VAE_SCALING = 0.18215
SDXL_UNET_WIDTHS = (320, 640, 1280)
SDXL_VAE_SCALING = 0.13025
SDXL_TIME_IDS = 6            # original size, crop top-left, target size (2 each)


def file_family(tensors: Mapping, source: str) -> str:
  """'clip' (SD 1.x), 'openclip' (SD 2.x) or 'sdxl' (SDXL base) from the file's keys; a
  one-line ModelFileError naming the key for other models (the SDXL refiner, EDM and inpainting
  SDXL models). Of the tensors only conv_in's `.shape` is read."""
  keys = tensors.keys()
  if not any(k.startswith(UNET_PREFIX) for k in keys):
    raise ModelFileError(f"{source}: not a Stable Diffusion single-file checkpoint (no "
                         f"'{UNET_PREFIX}*' tensors)")
  conditioner = sorted(k for k in keys if k.startswith(SDXL_PREFIX))
  if conditioner:
    return _check_sdxl(tensors, conditioner, source)
  if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
    return "openclip"
  if any(k.startswith(CLIP_PREFIX_SHORT) for k in keys):
    return "clip"
  raise ModelFileError(f"{source}: no text encoder ('{CLIP_PREFIX}*' for SD 1.x, "
                       f"'{OPENCLIP_PREFIX}*' for SD 2.x or '{SDXL_PREFIX}*' for SDXL)")


def _check_sdxl(tensors: Mapping, conditioner: list[str], source: str) -> str:
  """'sdxl' for an SDXL base layout (embedder 0 CLIP ViT-L, embedder 1 OpenCLIP, 4 latent
  channels); the refiner (OpenCLIP alone as embedder 0, 5 time ids), EDM, inpainting and other
  SDXL-family files are refused."""
  keys = tensors.keys()
  refiner = [k for k in conditioner if k.startswith("conditioner.embedders.0.model.")]
  if refiner:
    key = next((k for k in refiner if k.endswith(".text_projection")), refiner[0])
    raise ModelFileError(f"{source}: '{key}' (OpenCLIP as the only text encoder): an SDXL "
                         "refiner single file; persona_jax loads the SDXL base (sd_xl_base_1.0 "
                         "and fine-tunes of it), not the refiner")
  for key in ("edm_mean", "edm_std"):
    if key in keys:
      raise ModelFileError(f"{source}: '{key}': an SDXL model with an EDM schedule (Playground "
                           "v2.5); persona_jax supports SDXL base-style (DDPM) models")
  conv_in = f"{UNET_PREFIX}input_blocks.0.0.weight"
  if conv_in in keys and len(np.shape(tensors[conv_in])) == 4 and np.shape(tensors[conv_in])[1] != 4:
    raise ModelFileError(f"{source}: '{conv_in}' takes {np.shape(tensors[conv_in])[1]} input "
                         "channels, not 4 latents: an SDXL inpainting or image-conditioned "
                         "model; persona_jax supports text-to-image SDXL")
  other = [k for k in conditioner if not k.startswith(("conditioner.embedders.0.transformer.",
                                                       SDXL_OPENCLIP_PREFIX))]
  if other:
    raise ModelFileError(f"{source}: '{other[0]}' is no text encoder of the SDXL base (CLIP "
                         f"ViT-L '{SDXL_CLIP_PREFIX}*', OpenCLIP ViT-bigG "
                         f"'{SDXL_OPENCLIP_PREFIX}*'); this SDXL variant is not supported")
  for prefix, name in ((SDXL_CLIP_PREFIX, "CLIP ViT-L"), (SDXL_OPENCLIP_PREFIX, "OpenCLIP ViT-bigG")):
    if not any(k.startswith(prefix) for k in conditioner):
      raise ModelFileError(f"{source}: an SDXL checkpoint without its {name} text encoder (no "
                           f"'{prefix}*' tensors); persona_jax needs both")
  return "sdxl"


def _keys_by_index(keys, pattern: str) -> dict[int, list[str]]:
  out: dict[int, list[str]] = {}
  for k in keys:
    m = re.match(pattern, k)
    if m:
      out.setdefault(int(m[1]), []).append(k)
  return dict(sorted(out.items()))


def infer_configs(tensors: Mapping, prediction_type: str, *, source: str = "single file") -> dict:
  """Raw diffusers configs (model_index, unet, text_encoder(_2), vae, scheduler) of a standard
  SD 1.x, 2.x or SDXL base single file. Widths, depths and block types come from the tensor
  shapes; what a file does not record comes from the family: SD 1.x 8 heads per UNet block,
  SD 2.x and SDXL head dim 64; the schedule the family was trained with (DDIM config; SDXL: the
  Euler config of stable-diffusion-xl-base-1.0); sample size 64 (96 for SD 2.x v-prediction, as
  2.1-768; 128 for SDXL). Only `.shape` of the tensors is read.

  Raises:
    ConfigError when the widths are not the family's (then head counts cannot be known): pass a
    config folder.
  """
  from persona_jax.diffusion.schedules import PREDICTION_TYPES
  if prediction_type not in PREDICTION_TYPES:
    raise ConfigError(f"prediction_type '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")
  family = file_family(tensors, source)
  shape = {k: tuple(np.shape(v)) for k, v in tensors.items()}
  v = prediction_type == "v_prediction"
  unet = _infer_unet(shape, family, v, source)
  if family == "sdxl":
    text_encoder = _infer_clip(shape, SDXL_CLIP_PREFIX)
    text_encoder_2 = _infer_openclip(shape, SDXL_OPENCLIP_PREFIX, penultimate=False)
    adm = shape[f"{UNET_PREFIX}label_emb.0.0.weight"][1]
    time_ids, rest = divmod(adm - text_encoder_2["projection_dim"], SDXL_TIME_IDS)
    if rest or time_ids <= 0:
      raise ConfigError(f"{source}: '{UNET_PREFIX}label_emb.0.0.weight' takes {adm} features, not "
                        f"the OpenCLIP projection ({text_encoder_2['projection_dim']}) + "
                        f"{SDXL_TIME_IDS} time ids; pass config_dir= (--config DIR)")
    unet.update(addition_embed_type="text_time", addition_time_embed_dim=time_ids,
                projection_class_embeddings_input_dim=adm)
    texts = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
  elif family == "openclip":
    texts = {"text_encoder": _infer_openclip(shape, OPENCLIP_PREFIX, penultimate=True)}
  else:
    p = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in shape) else CLIP_PREFIX_SHORT
    texts = {"text_encoder": _infer_clip(shape, p)}
  vae = _infer_vae(shape)
  scheduler = {
      "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
      "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
      "steps_offset": 1, "prediction_type": prediction_type, "timestep_spacing": "leading",
  }
  if family == "sdxl":
    vae.update(sample_size=1024, scaling_factor=SDXL_VAE_SCALING)
    scheduler.update(_class_name="EulerDiscreteScheduler", interpolation_type="linear",
                     use_karras_sigmas=False, skip_prk_steps=True, sample_max_value=1.0,
                     trained_betas=None)
    index = model_index("EulerDiscreteScheduler", sdxl=True)
  else:
    vae["sample_size"] = 768 if family == "openclip" and v else 512
    index = model_index()
  return {"model_index": index, "unet": unet, **texts, "vae": vae, "scheduler": scheduler}


def _infer_unet(shape: dict, family: str, v: bool, source: str) -> dict:
  """The UNet config from `model.diffusion_model.*` shapes (without SDXL's added conditioning)."""
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
  sdxl = family == "sdxl"
  standard = SDXL_UNET_WIDTHS if sdxl else SD_UNET_WIDTHS
  if widths != standard:
    name = "SDXL base's" if sdxl else "SD 1.x/2.x's"
    raise ConfigError(
        f"{source}: UNet block widths {widths} are not {name} {standard}, so its attention head "
        "counts cannot be inferred; pass config_dir= (--config DIR), a diffusers folder of the "
        "same architecture")
  attn = [all(a for _, a in b) for b in blocks]
  depths = []
  for b, has_attn in zip(blocks, attn):
    if has_attn:
      first = f"{u}input_blocks.{b[0][0]}.1.transformer_blocks."
      depths.append(len({k[len(first):].split(".")[0] for k in shape if k.startswith(first)}))
    else:
      depths.append(1)
  attn_key = next(k for k in shape if k.startswith(u) and k.endswith("attn2.to_k.weight"))
  proj_in = next(k for k in shape if k.startswith(u) and k.endswith("proj_in.weight"))
  layers = [len(b) for b in blocks]
  sd2 = family == "openclip"
  return {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": 128 if sdxl else 96 if sd2 and v else 64, "in_channels": conv_in[1],
      "out_channels": shape[f"{u}out.2.weight"][0],
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "block_out_channels": list(widths),
      "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
      "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
      "cross_attention_dim": shape[attn_key][1],
      "attention_head_dim": [w // 64 for w in widths] if sd2 or sdxl else 8,
      "use_linear_projection": len(shape[proj_in]) == 2,
      "upcast_attention": sd2 and v,
      "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
      "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
  }


def _text_config(token, position, intermediate, n_layers, **extra) -> dict:
  return {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": token[0], "hidden_size": token[1], "intermediate_size": intermediate,
      "num_hidden_layers": n_layers, "num_attention_heads": token[1] // 64,
      "max_position_embeddings": position[0], "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
      "initializer_range": 0.02, "initializer_factor": 1.0,
      # The Hub's SD and SDXL configs carry these legacy ids (eos 2: pool at the argmax id).
      "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, **extra,
  }


def _infer_clip(shape: dict, p: str) -> dict:
  """OpenAI CLIP (transformers names under `p`): SD 1.x's and SDXL's first text encoder."""
  return _text_config(
      shape[f"{p}embeddings.token_embedding.weight"],
      shape[f"{p}embeddings.position_embedding.weight"],
      shape[f"{p}encoder.layers.0.mlp.fc1.weight"][0],
      len(_keys_by_index(shape, rf"^{re.escape(p)}encoder\.layers\.(\d+)\.")),
      hidden_act="quick_gelu", projection_dim=768)


def _infer_openclip(shape: dict, p: str, *, penultimate: bool) -> dict:
  """OpenCLIP under `p`. SD 2.x (`penultimate`): diffusers keeps all layers but the last, which
  the file has beside text_projection; SDXL's text_encoder_2 keeps all of them and the
  projection (CLIPTextModelWithProjection, projection_dim = text_projection's columns)."""
  resblocks = _keys_by_index(shape, rf"^{re.escape(p)}transformer\.resblocks\.(\d+)\.")
  projection = shape.get(f"{p}text_projection")
  n_layers = len(resblocks) - (1 if penultimate and projection is not None else 0)
  extra = {"hidden_act": "gelu", "projection_dim": 512}
  if not penultimate:
    extra.update(architectures=["CLIPTextModelWithProjection"], projection_dim=projection[1])
  return _text_config(shape[f"{p}token_embedding.weight"], shape[f"{p}positional_embedding"],
                      shape[f"{p}transformer.resblocks.0.mlp.c_fc.weight"][0], n_layers, **extra)


def _infer_vae(shape: dict) -> dict:
  p = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in shape) else VAE_PREFIX_ALT
  down = _keys_by_index(shape, rf"^{re.escape(p)}encoder\.down\.(\d+)\.")
  widths = [shape[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in down]
  return {
      "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
      "in_channels": shape[f"{p}encoder.conv_in.weight"][1],
      "out_channels": shape[f"{p}decoder.conv_out.weight"][0],
      "latent_channels": shape[f"{p}decoder.conv_in.weight"][1],
      "down_block_types": ["DownEncoderBlock2D"] * len(widths),
      "up_block_types": ["UpDecoderBlock2D"] * len(widths),
      "block_out_channels": widths,
      "layers_per_block": len(_keys_by_index(shape, rf"^{re.escape(p)}encoder\.down\.0\.block\.(\d+)\.")),
      "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512, "scaling_factor": SD_VAE_SCALING,
      "force_upcast": True,
  }
