"""UNet blocks named as practitioners name them (A1111's LoRA block weights, kohya's block dims):
IN00..INnn, MID, OUT00..OUTnn, and BASE for the text encoders (SDXL: both).

The names follow LDM's `input_blocks` / `output_blocks` numbering, derived by a general rule from
the UNet's own structure, so a UNet with another number of levels or layers gets consistent names:
  conv_in                                      -> IN00
  down_blocks_i/{resnets,attentions}_j         -> IN(1 + sum_{k<i}(L_k + 1) + j)
  down_blocks_i/downsamplers_0                 -> IN(1 + sum_{k<i}(L_k + 1) + L_i)
  mid_block/...                                -> MID
  up_blocks_i/{resnets,attentions}_j           -> OUT(sum_{k<i} U_k + j)
  up_blocks_i/upsamplers_0                     -> OUT(sum_{k<i} U_k + U_i - 1)
with L_i the layers of down level i and U_i = L_(n-1-i) + 1 those of up level i. For SD 1.x/2.x
(4 levels, 2 layers) this is IN00..IN11, MID, OUT00..OUT11 (methods.md 0.2); for SDXL (3 levels,
2 layers) IN00..IN08, MID, OUT00..OUT08, LDM's `input_blocks.i` / `output_blocks.i` numbering as
kohya and sd-webui-lora-block-weight use it. The time and added-condition embeddings and the
output head (conv_norm_out, conv_out) belong to no block.

Presets (methods.md 4.2), from the UNet's structure: "26" = BASE, every IN, MID, every OUT
(LoCon/LyCORIS; 26 values on SD 1.x, the extension's 20 "XL full" on SDXL); "17" = BASE and the
blocks that hold a transformer (plain attention LoRA; 17 on SD 1.x, the extension's 12 "XL" list
BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05 on SDXL). Blocks outside a short list get 0, as
the extension's `to26()` fills its 26 slots. Per-block ranks also take kohya's SDXL `block_dims`
order (sdxl_train.py, networks/lora.py `get_block_index`): 1 + n_in + 3 + n_out + 1 values,
time/label embedding, input_blocks, middle_block 0..2, output_blocks, out (23 on SDXL).
"""

from __future__ import annotations

import re

from persona_jax.errors import ConfigError
from persona_jax.models.configs import UNetConfig

BASE, MID = "BASE", "MID"
ALIASES = {"M00": MID}
_PART = re.compile(r"(down|up)_blocks_(\d+)/(resnets|attentions|downsamplers|upsamplers)_(\d+)(/|$)")


def _down_layers(config: UNetConfig) -> tuple[int, ...]:
  return tuple(config.layers_per_block_list)


def _up_layers(config: UNetConfig) -> tuple[int, ...]:
  return tuple(n + 1 for n in reversed(_down_layers(config)))


def unet_block(path: str, config: UNetConfig) -> str | None:
  """The block name of a UNet param path (`down_blocks_1/attentions_0/...`), or None."""
  if path.startswith("conv_in/"):
    return "IN00"
  if path.startswith("mid_block/"):
    return MID
  m = _PART.match(path)
  if not m:
    return None
  side, level, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
  if side == "down":
    layers = _down_layers(config)
    start = 1 + sum(n + 1 for n in layers[:level])
    return f"IN{start + (layers[level] if kind == 'downsamplers' else j):02d}"
  layers = _up_layers(config)
  start = sum(layers[:level])
  return f"OUT{start + (layers[level] - 1 if kind == 'upsamplers' else j):02d}"


_TEXT = re.compile(r"text_encoder(_2)?/")


def param_block(path: str, config: UNetConfig) -> str | None:
  """The block of a `/`-joined path of the whole pipeline (`unet/...`, `text_encoder/...`,
  `text_encoder_2/...`: every text encoder is BASE)."""
  if _TEXT.match(path):
    return BASE
  if path.startswith("unet/"):
    return unet_block(path[len("unet/"):], config)
  return None


def all_blocks(config: UNetConfig) -> tuple[str, ...]:
  """BASE, IN00.., MID, OUT00.. of this UNet, in that order (the 26-block preset for SD 1.x)."""
  n_in = sum(n + 1 for n in _down_layers(config))        # conv_in + layers + downsamplers (n-1)
  n_out = sum(_up_layers(config))
  mid = (MID,) if config.mid_block_type is not None else ()
  return ((BASE,) + tuple(f"IN{k:02d}" for k in range(n_in)) + mid
          + tuple(f"OUT{k:02d}" for k in range(n_out)))


def attention_blocks(config: UNetConfig) -> tuple[str, ...]:
  """BASE and the blocks holding a transformer (the 17-block preset for SD 1.x)."""
  out = [BASE]
  for i, kind in enumerate(config.down_block_types):
    if kind.startswith("CrossAttn"):
      out += [unet_block(f"down_blocks_{i}/attentions_{j}/", config)
              for j in range(_down_layers(config)[i])]
  if config.mid_block_type is not None:                  # the only mid block: cross-attention
    out.append(MID)
  for i, kind in enumerate(config.up_block_types):
    if kind.startswith("CrossAttn"):
      out += [unet_block(f"up_blocks_{i}/attentions_{j}/", config)
              for j in range(_up_layers(config)[i])]
  return tuple(out)


def kohya_order(config: UNetConfig) -> tuple[str | None, ...]:
  """Our block of each entry of kohya's SDXL per-block list (`block_dims`, `block_alphas`,
  sdxl_train.py's `block_lr`): the embeddings (None: no LoRA), every IN, MID three times
  (middle_block 0, 1, 2), every OUT, the output head (None). 23 entries on SDXL."""
  blocks = all_blocks(config)
  ins = tuple(b for b in blocks if b.startswith("IN"))
  outs = tuple(b for b in blocks if b.startswith("OUT"))
  return (None,) + ins + ((MID,) if MID in blocks else (None,)) * 3 + outs + (None,)


PRESETS = {"26": all_blocks, "17": attention_blocks}

# sd-webui-lora-block-weight's named presets (methods.md 4.2), values in its 17-block order (the
# attention blocks of SD 1.x/2.x; the extension has no named SDXL presets).
LBW_ORDER = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", MID,
             *(f"OUT{i:02d}" for i in range(3, 12)))
LBW_PRESETS = {
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13,
    "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10,
    "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0) + (1,) * 8 + (0,) * 5,
    "OUTD": (1,) + (0,) * 7 + (1,) * 4 + (0,) * 5,
    "OUTS": (1,) + (0,) * 11 + (1,) * 5,
    "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
}


def block_values(spec: str, config: UNetConfig, field: str) -> dict[str, float]:
  """{block: value} for every block from a named preset (LBW_PRESETS; SD 1.x/2.x block layout
  only) or comma-separated numbers in a preset's order (17 / 26 on SD 1.x, 12 / 20 on SDXL);
  blocks outside a short list get 0, as the extension's `to26()` fills them
  (sd-webui-lora-block-weight scripts/lora_block_weight.py)."""
  text = spec.strip()
  sizes = f"{len(all_blocks(config))} or {len(attention_blocks(config))}"
  if text.upper() in LBW_PRESETS:
    if attention_blocks(config) != LBW_ORDER:
      raise ConfigError(f"{field}: '{spec}' is a preset over sd-webui-lora-block-weight's 17 SD "
                        f"1.x/2.x blocks, which this UNet does not have: give {sizes} "
                        "comma-separated numbers (SDXL: 20 or 12)")
    values = LBW_PRESETS[text.upper()]
  else:
    try:
      values = tuple(float(v) for v in text.split(","))
    except ValueError:
      raise ConfigError(f"{field}: '{spec}' is neither a preset ({', '.join(LBW_PRESETS)}) nor "
                        f"{sizes} comma-separated numbers") from None
  return {b: float(0.0 if v is None else v) for b, v in per_block(values, config, field).items()}


def preset(name: str, config: UNetConfig) -> tuple[str, ...]:
  if name not in PRESETS:
    raise ConfigError(f"block preset '{name}' is not one of {', '.join(PRESETS)}")
  return PRESETS[name](config)


def canonical(name: str, config: UNetConfig, field: str = "blocks") -> str:
  """A block name checked against this UNet (`M00` is `MID`); an unknown name is an error."""
  name = ALIASES.get(name.upper(), name.upper())
  known = all_blocks(config)
  if name not in known:
    ins = [b for b in known if b.startswith("IN")]
    outs = [b for b in known if b.startswith("OUT")]
    raise ConfigError(f"{field}: block '{name}' does not exist in this UNet (its blocks: BASE, "
                      f"{ins[0]}..{ins[-1]}{', MID' if MID in known else ''}, "
                      f"{outs[0]}..{outs[-1]})")
  return name


def per_block(values, config: UNetConfig, field: str, default=None) -> dict[str, object]:
  """{block: value} from a mapping {name: value}, or from a sequence ordered like a preset of the
  same length (17 or 26 values for SD 1.x, 12 or 20 for SDXL; any block not given gets
  `default`), or like kohya's SDXL list (`kohya_order`: 23 values on SDXL; its three middle_block
  values must agree, MID being one block here; the embeddings' and head's are ignored)."""
  blocks = all_blocks(config)
  out = {b: default for b in blocks}
  if isinstance(values, dict):
    for name, v in values.items():
      out[canonical(name, config, field)] = v
    return out
  values = tuple(values)
  for order in (all_blocks(config), attention_blocks(config)):
    if len(values) == len(order):
      out.update(zip(order, values))
      return out
  kohya = kohya_order(config)
  if len(values) == len(kohya):
    mid = {v for b, v in zip(kohya, values) if b == MID}
    if len(mid) > 1:
      raise ConfigError(f"{field}: kohya's three middle_block values differ ({sorted(mid)}); "
                        "persona_jax has one MID block: give them equal")
    out.update((b, v) for b, v in zip(kohya, values) if b is not None)
    return out
  raise ConfigError(f"{field}: {len(values)} values; give one per block of a preset "
                    f"({len(all_blocks(config))} for all blocks, {len(attention_blocks(config))} "
                    f"for the attention blocks, {len(kohya)} as kohya's SDXL block_dims) "
                    "or a {name: value} mapping")
