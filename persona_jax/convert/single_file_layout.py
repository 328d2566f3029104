"""The name table of original single-file checkpoints (LDM/SGM layout, formats.md 3 and 4.5):
for every diffusers key of each component, where it lives in a single file (`Slot`), built from our
own param tree and the diffusers configs. SD 1.x (CLIP text under `cond_stage_model.transformer.`),
SD 2.x (OpenCLIP under `cond_stage_model.model.`: fused q/k/v) and SDXL (`conditioner.embedders.0`
CLIP, `conditioner.embedders.1` OpenCLIP with `text_projection` stored as the matrix of x @ P,
`label_emb` for the added conditioning). convert/single_file.py reads and writes the files with it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

from persona_jax.convert.diffusers import key_table
from persona_jax.convert.single_file_configs import (CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_CLIP_PREFIX,
                                                     SDXL_OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX)
from persona_jax.errors import ConfigError
from persona_jax.models.components import abstract_params
from persona_jax.models.configs import TextEncoderConfig, UNetConfig, VAEConfig

COMPONENTS = ("unet", "text_encoder", "vae")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2",)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}



@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one diffusers tensor lives in a single file."""
  key: str                        # single-file key
  part: int | None = None         # which third (q, k, v) of a fused OpenCLIP in_proj tensor
  conv1x1: bool = False           # a Linear weight stored as a (out, in, 1, 1) conv
  transposed: bool = False        # a Linear weight stored as the (in, out) matrix of `x @ P`


def text_format(text_encoder_config: TextEncoderConfig) -> str:
  """'openclip' (SD 2.x: OpenCLIP ViT-H, gelu) or 'clip' (SD 1.x: OpenAI CLIP, quick_gelu)."""
  return "openclip" if text_encoder_config.hidden_act == "gelu" else "clip"


def family(configs: Mapping) -> str:
  """'sdxl' (a text_encoder_2), else the text encoder's `text_format`: as `file_family` names a
  file's."""
  configs = typed_configs(configs)
  return "sdxl" if "text_encoder_2" in configs else text_format(configs["text_encoder"])


def typed_configs(configs: Mapping) -> dict:
  """{"unet": UNetConfig, "text_encoder": ..., "vae": ...} (+ "text_encoder_2" for SDXL, with
  its projection) from typed or raw JSON configs, keyed by component name or as `parse_configs`
  returns them (`unet_config`, ...)."""
  classes = {"unet": UNetConfig, "text_encoder": TextEncoderConfig, "vae": VAEConfig,
             "text_encoder_2": TextEncoderConfig}
  out = {}
  for name, cls in classes.items():
    c = configs.get(name, configs.get(f"{name}_config"))
    if c is None and name == "text_encoder_2":
      continue
    out[name] = cls.from_dict(c, f"{name}/config.json") if isinstance(c, Mapping) else c
  if "text_encoder_2" in out and not out["text_encoder_2"].with_projection:
    out["text_encoder_2"] = dataclasses.replace(out["text_encoder_2"], with_projection=True)
  return out


def components(configs: Mapping) -> tuple[str, ...]:
  """The weight-bearing components: COMPONENTS, + text_encoder_2 for SDXL."""
  return SDXL_COMPONENTS if "text_encoder_2" in typed_configs(configs) else COMPONENTS


# ---------------------------------------------------------------------------------------------
# The name table.


def _by_prefix(keys, prefixes: Mapping[str, tuple[str, Mapping | None]], head: str) -> dict:
  """Maps diffusers keys by their longest listed prefix; `rename` maps the next part of the key."""
  ordered = sorted(prefixes, key=len, reverse=True)
  out = {}
  for key in keys:
    prefix = next((p for p in ordered if key.startswith(p)), None)
    if prefix is None:
      raise ConfigError(f"no single-file name for {key}: this UNet has parts an SD 1.x/2.x/SDXL "
                        "single file cannot hold")
    target, rename = prefixes[prefix]
    rest = key[len(prefix):]
    if rename:
      first, _, tail = rest.partition(".")
      rest = f"{rename.get(first, first)}.{tail}" if tail else rename.get(first, first)
    out[key] = Slot(head + target + rest)
  return out


def _unet_slots(config: UNetConfig, keys) -> dict[str, Slot]:
  """formats.md 3.2, with running block indices (so per-block layers_per_block works too)."""
  n = len(config.block_out_channels)
  layers = config.layers_per_block_list
  prefixes = {"conv_in.": ("input_blocks.0.0.", None), "time_embedding.linear_1.": ("time_embed.0.", None),
              "time_embedding.linear_2.": ("time_embed.2.", None), "conv_norm_out.": ("out.0.", None),
              "conv_out.": ("out.2.", None),
              "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
              "mid_block.attentions.0.": ("middle_block.1.", None),
              "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
              "add_embedding.linear_1.": ("label_emb.0.0.", None),        # SDXL text_time
              "add_embedding.linear_2.": ("label_emb.0.2.", None)}
  index = 1
  for i in range(n):
    for j in range(layers[i]):
      prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{index}.0.", _UNET_RESNET)
      prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{index}.1.", None)
      index += 1
    if i < n - 1:
      prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", None)
      index += 1
  index = 0
  for i, up_type in enumerate(config.up_block_types):
    for j in range(layers[n - 1 - i] + 1):
      prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{index}.0.", _UNET_RESNET)
      prefixes[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{index}.1.", None)
      index += 1
    if i < n - 1:
      slot = 2 if up_type.startswith("CrossAttn") else 1
      prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{index - 1}.{slot}.conv.", None)
  return _by_prefix(keys, prefixes, UNET_PREFIX)


def _vae_slots(config: VAEConfig, keys) -> dict[str, Slot]:
  """formats.md 3.3: decoder blocks numbered in reverse, attention as 1x1 convs."""
  n = len(config.block_out_channels)
  resnet = {"conv_shortcut": "nin_shortcut"}
  prefixes = {"quant_conv.": ("quant_conv.", None), "post_quant_conv.": ("post_quant_conv.", None)}
  for part in ("encoder", "decoder"):
    prefixes.update({
        f"{part}.conv_in.": (f"{part}.conv_in.", None), f"{part}.conv_out.": (f"{part}.conv_out.", None),
        f"{part}.conv_norm_out.": (f"{part}.norm_out.", None),
        f"{part}.mid_block.resnets.0.": (f"{part}.mid.block_1.", resnet),
        f"{part}.mid_block.resnets.1.": (f"{part}.mid.block_2.", resnet),
        f"{part}.mid_block.attentions.0.": (f"{part}.mid.attn_1.", None)})
  for i in range(n):
    prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", None)
    prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{n - 1 - i}.upsample.conv.", None)
    for j in range(config.layers_per_block + 1):
      prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", resnet)
      prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{n - 1 - i}.block.{j}.", resnet)
  out = {}
  for key, slot in _by_prefix(keys, prefixes, VAE_PREFIX).items():
    m = re.match(r"^(.*\.mid\.attn_1\.)(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", slot.key)
    if m:
      slot = Slot(f"{m[1]}{_VAE_ATTENTION[m[2]]}.{m[3]}", conv1x1=m[3] == "weight" and m[2] != "group_norm")
    out[key] = slot
  return out


def _clip_slots(keys, prefix: str) -> dict[str, Slot]:
  """transformers' CLIP names under `prefix` (SD 1.x; SDXL's text_encoder)."""
  return {key: Slot(prefix + key) for key in keys}


def _openclip_slots(keys, prefix: str) -> dict[str, Slot]:
  """OpenCLIP names under `prefix` (SD 2.x; SDXL's text_encoder_2, with its projection)."""
  fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
  out = {}
  for key in keys:
    if key in fixed:
      out[key] = Slot(prefix + fixed[key])
      continue
    if key == "text_projection.weight":
      out[key] = Slot(prefix + "text_projection", transposed=True)
      continue
    m = re.match(r"^encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key)
    if m is None:
      raise ConfigError(f"no OpenCLIP single-file name for text encoder tensor {key}")
    block = f"{prefix}transformer.resblocks.{m[1]}."
    qkv = re.match(r"^self_attn\.([qkv]_proj)$", m[2])
    if qkv:
      out[key] = Slot(f"{block}attn.in_proj_{m[3]}", part=_QKV[qkv[1]])
    else:
      out[key] = Slot(f"{block}{_OPENCLIP_LAYER[m[2]]}.{m[3]}")
  return out


@functools.lru_cache(maxsize=16)
def cached_abstract_params(name: str, config):
  """`abstract_params`, once per config (configs are frozen dataclasses); callers only read it."""
  return abstract_params(name, config)


def key_tables(configs: Mapping) -> dict:
  """{component: convert.key_table} of the model the configs describe (shapes only)."""
  configs = typed_configs(configs)
  return {name: key_table(cached_abstract_params(name, configs[name])) for name in components(configs)}


def single_file_layout(configs: Mapping, tables: Mapping | None = None) -> dict[str, dict[str, Slot]]:
  """{component: {diffusers key: Slot}} for the model the configs describe (text encoder keys
  without transformers' `text_model.` prefix, as `convert.key_table` names them). `tables`:
  `key_tables(configs)` when the caller has them already."""
  configs = typed_configs(configs)
  tables = tables or key_tables(configs)
  out = {"unet": _unet_slots(configs["unet"], tables["unet"]),
         "vae": _vae_slots(configs["vae"], tables["vae"])}
  if "text_encoder_2" in configs:
    out["text_encoder"] = _clip_slots(tables["text_encoder"], SDXL_CLIP_PREFIX)
    out["text_encoder_2"] = _openclip_slots(tables["text_encoder_2"], SDXL_OPENCLIP_PREFIX)
  elif text_format(configs["text_encoder"]) == "clip":
    out["text_encoder"] = _clip_slots(tables["text_encoder"], CLIP_PREFIX)
  else:
    out["text_encoder"] = _openclip_slots(tables["text_encoder"], OPENCLIP_PREFIX)
  return {name: out[name] for name in components(configs)}
