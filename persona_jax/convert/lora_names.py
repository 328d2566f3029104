"""LoRA module names across tools: our kernel paths -> diffusers/PEFT module names
(`module_names`), kohya/A1111 names (`kohya_name`, `kohya_names`) and, for SDXL, the original
LDM/SGM UNet names kohya's SDXL files use (`sgm_modules`). convert/lora_formats.py reads and writes
the files with them."""

from __future__ import annotations

import re
from collections import Counter

from persona_jax import tree
from persona_jax.convert.diffusers import torch_name

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet",) + TEXT_ENCODERS
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# Two text encoders (SDXL): kohya's lora_te1_ / lora_te2_ (networks/lora.py LORA_PREFIX_TEXT_ENCODER1/2).
KOHYA_XL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def module_names(base_params) -> dict[str, str]:
  """Our kernel path -> diffusers module name with its component prefix, for every UNet and text
  encoder kernel: 'unet/down_blocks_0/.../to_q/kernel' -> 'unet.down_blocks.0....to_q',
  'text_encoder/encoder/layers_0/self_attn/q_proj/kernel' ->
  'text_encoder.text_model.encoder.layers.0.self_attn.q_proj' (text_encoder_2 alike; its
  `text_projection` sits beside `text_model`)."""
  out = {}
  for path in tree.flatten(base_params):
    parts = path.split("/")
    if parts[0] not in COMPONENTS or parts[-1] != "kernel":
      continue
    module = torch_name(tuple(parts[1:]))[: -len(".weight")]
    text = parts[0] in TEXT_ENCODERS and parts[1] != "text_projection"
    out[path] = f"{parts[0]}.{'text_model.' if text else ''}{module}"
  return out


def kohya_name(module: str) -> str:
  """'unet.down_blocks.0.attentions.0...' -> 'lora_unet_down_blocks_0_attentions_0...' (the
  SD 1.x/2.x spelling; a base with two text encoders: `kohya_names`)."""
  component, _, rest = module.partition(".")
  return KOHYA_PREFIX[component] + rest.replace(".", "_")


# LDM/SGM names of the UNet (kohya's SDXL UNet, library/sdxl_original_unet.py; diffusers reads them
# back with lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers and _convert_unet_lora_key).
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}
_LEVEL_PART = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_PART = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def sgm_modules(unet_modules) -> dict[str, str]:
  """diffusers UNet module names (without `unet.`) -> LDM/SGM names, as `input_blocks` /
  `output_blocks` number them (models/block_names.py's IN/OUT numbers):
    down_blocks.i.resnets.j.conv1      -> input_blocks.(1 + sum_{k<i}(L_k + 1) + j).0.in_layers.2
    down_blocks.i.attentions.j.X       -> input_blocks.(same).1.X
    down_blocks.i.downsamplers.0.conv  -> input_blocks.(1 + sum_{k<=i}(L_k + 1) - 1).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
    up_blocks.i.resnets.j / attentions.j -> output_blocks.(sum_{k<i} U_k + j).0 / .1
    up_blocks.i.upsamplers.0.conv      -> output_blocks.(sum_{k<=i} U_k - 1).(2, or 1 without
                                          attentions).conv
  with conv2 -> out_layers.3, time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection
  (L_i, U_i: the resnets of down / up level i). Modules without an SGM name are left out."""
  layers, attention = Counter(), set()
  for m in unet_modules:
    part = _LEVEL_PART.fullmatch(m)
    if part and part[3] == "resnets":
      key = (part[1], int(part[2]))
      layers[key] = max(layers[key], int(part[4]) + 1)
    elif part and part[3] == "attentions":
      attention.add((part[1], int(part[2])))

  def start(side, level):
    if side == "down":
      return 1 + sum(layers["down", k] + 1 for k in range(level))
    return sum(layers["up", k] for k in range(level))

  out = {}
  for m in unet_modules:
    name = None
    if m in _SGM_TOP:
      name = _SGM_TOP[m]
    elif part := _LEVEL_PART.fullmatch(m):
      side, level, kind, j, rest = part[1], int(part[2]), part[3], int(part[4]), part[5]
      blocks = "input_blocks" if side == "down" else "output_blocks"
      first = start(side, level)
      if kind == "resnets" and rest in _SGM_RESNET:
        name = f"{blocks}.{first + j}.0.{_SGM_RESNET[rest]}"
      elif kind == "attentions":
        name = f"{blocks}.{first + j}.1.{rest}"
      elif kind == "downsamplers" and rest == "conv":
        name = f"input_blocks.{first + layers[side, level]}.0.op"
      elif kind == "upsamplers" and rest == "conv":
        inner = 2 if (side, level) in attention else 1
        name = f"output_blocks.{first + layers[side, level] - 1}.{inner}.conv"
    elif part := _MID_PART.fullmatch(m):
      kind, j, rest = part[1], int(part[2]), part[3]
      if kind == "attentions":
        name = f"middle_block.1.{rest}"
      elif rest in _SGM_RESNET:
        name = f"middle_block.{2 * j}.{_SGM_RESNET[rest]}"
    if name is not None:
      out[m] = name
  return out


def kohya_names(base_params, *, every_spelling: bool = False) -> dict[str, str | tuple[str, ...]]:
  """Our kernel path -> kohya's module name (the key without `.lora_down.weight`): on a base with
  one text encoder `lora_unet_` + the diffusers name and `lora_te_`; with two (SDXL, as
  sdxl_train_network.py writes) `lora_unet_` + the SGM name (`sgm_modules`), `lora_te1_` and
  `lora_te2_`. `every_spelling`: a tuple of every name a reader accepts instead (both UNet
  spellings; `lora_te_` and `lora_te1_` for the first encoder, as diffusers reads them; text
  encoder names with and without `text_model_`, which diffusers' convert_state_dict_to_kohya
  leaves out under transformers 5)."""
  names = module_names(base_params)
  xl = "text_encoder_2" in base_params
  sgm = sgm_modules([m[len("unet."):] for m in names.values() if m.startswith("unet.")])
  out = {}
  for path, module in names.items():
    component, _, rest = module.partition(".")
    if component == "unet":
      spellings = ([sgm[rest]] if rest in sgm else []) + [rest]
      spellings = [f"lora_unet_{n.replace('.', '_')}" for n in spellings]
      if not xl:
        spellings.reverse()
    else:
      prefixes = [KOHYA_XL_PREFIX[component]] if xl else [KOHYA_PREFIX.get(component)]
      prefixes += {"text_encoder": ["lora_te_", "lora_te1_"]}.get(component, [])
      rests = dict.fromkeys((rest, rest.removeprefix("text_model.")))    # transformers 5 drops it
      spellings = [f"{p}{r.replace('.', '_')}" for p in dict.fromkeys(prefixes) if p for r in rests]
    if spellings:
      out[path] = tuple(spellings) if every_spelling else spellings[0]
  return out
