"""Block names (IN00..OUT11, MID, BASE) derived from the UNet's structure."""

import functools
import re

import pytest

from persona_jax import ConfigError, tree
from persona_jax.models import block_names as bn
from persona_jax.models.configs import UNetConfig
from persona_jax.models.components import abstract_params

SD1 = UNetConfig.from_dict(dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, attention_head_dim=8))

THREE_LEVELS = UNetConfig.from_dict(dict(
    block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4))

@functools.lru_cache
def unet_params(name):
  """The abstract UNet params of a config above (once per test process)."""
  return abstract_params("unet", globals()[name])


BLOCKLESS = ("time_embedding/", "add_embedding/", "conv_norm_out/", "conv_out/")


def test_sd1_map_matches_the_ldm_table():
  cases = {
      "conv_in/kernel": "IN00",
      "down_blocks_0/resnets_0/conv1/kernel": "IN01", "down_blocks_0/attentions_1/proj_in/kernel": "IN02",
      "down_blocks_0/downsamplers_0/conv/kernel": "IN03", "down_blocks_1/resnets_0/conv1/kernel": "IN04",
      "down_blocks_1/downsamplers_0/conv/bias": "IN06", "down_blocks_2/attentions_1/norm/scale": "IN08",
      "down_blocks_2/downsamplers_0/conv/kernel": "IN09", "down_blocks_3/resnets_0/conv1/kernel": "IN10",
      "down_blocks_3/resnets_1/conv2/kernel": "IN11",
      "mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel": "MID",
      "up_blocks_0/resnets_0/conv1/kernel": "OUT00", "up_blocks_0/resnets_2/conv1/kernel": "OUT02",
      "up_blocks_0/upsamplers_0/conv/kernel": "OUT02", "up_blocks_1/attentions_0/proj_out/kernel": "OUT03",
      "up_blocks_1/upsamplers_0/conv/kernel": "OUT05", "up_blocks_2/resnets_1/conv1/kernel": "OUT07",
      "up_blocks_3/attentions_2/transformer_blocks_0/attn1/to_q/kernel": "OUT11",
      "time_embedding/linear_1/kernel": None, "conv_out/kernel": None,
  }
  for path, block in cases.items():
    assert bn.unet_block(path, SD1) == block, path
  assert bn.param_block("text_encoder/encoder/layers_0/mlp/fc1/kernel", SD1) == "BASE"
  assert bn.param_block("unet/down_blocks_1/attentions_0/proj_in/kernel", SD1) == "IN04"


def test_sd1_presets():
  assert bn.preset("26", SD1) == ("BASE", *[f"IN{i:02d}" for i in range(12)], "MID",
                                   *[f"OUT{i:02d}" for i in range(12)])
  assert bn.preset("17", SD1) == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                                   "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09",
                                   "OUT10", "OUT11")
  with pytest.raises(ConfigError, match="block preset '12'"):
    bn.preset("12", SD1)


@pytest.mark.parametrize("config", ["SD1", "THREE_LEVELS", "SDXL"])
def test_every_param_has_a_block_and_every_block_has_params(config):
  paths = tree.paths(unet_params(config))
  config = globals()[config]
  blocks = {p: bn.unet_block(p, config) for p in paths}
  assert {p for p, b in blocks.items() if b is None} == {p for p in paths if p.startswith(BLOCKLESS)}
  assert set(blocks.values()) - {None} == set(bn.all_blocks(config)) - {"BASE"}
  # The attention preset is exactly the blocks with a transformer's params.
  with_attention = {b for p, b in blocks.items() if "/attentions_" in p}
  assert set(bn.attention_blocks(config)) - {"BASE"} == with_attention


def test_three_level_unet_names():
  assert bn.all_blocks(THREE_LEVELS) == ("BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05",
                                         "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
  assert bn.attention_blocks(THREE_LEVELS) == ("BASE", "IN01", "IN03", "MID", "OUT02", "OUT03",
                                               "OUT04", "OUT05")
  assert bn.unet_block("down_blocks_1/downsamplers_0/conv/kernel", THREE_LEVELS) == "IN04"
  assert bn.unet_block("up_blocks_0/upsamplers_0/conv/kernel", THREE_LEVELS) == "OUT01"
  with pytest.raises(ConfigError, match=r"block 'IN06' does not exist in this UNet \(its blocks: "
                                        r"BASE, IN00..IN05, MID, OUT00..OUT05\)"):
    bn.canonical("IN06", THREE_LEVELS, "method.block_ranks")


def test_per_block_values():
  ranks = bn.per_block({"in01": 4, "M00": 8, "OUT11": 0}, SD1, "ranks", default=2)
  assert ranks["IN01"] == 4 and ranks["MID"] == 8 and ranks["OUT11"] == 0 and ranks["IN02"] == 2
  seventeen = bn.per_block(range(17), SD1, "weights", default=0)
  assert seventeen["BASE"] == 0 and seventeen["IN01"] == 1 and seventeen["OUT11"] == 16
  assert seventeen["IN00"] == 0 and seventeen["OUT00"] == 0
  assert bn.per_block(range(26), SD1, "weights")["OUT11"] == 25
  with pytest.raises(ConfigError, match="weights: 5 values"):
    bn.per_block(range(5), SD1, "weights")
  with pytest.raises(ConfigError, match="block 'OUT12' does not exist"):
    bn.per_block({"OUT12": 1}, SD1, "ranks")


@pytest.mark.parametrize("preset, blocks", [
    ("MIDD", {"IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06"}),
    ("OUTALL", {"OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"}),
])
def test_lora_block_preset_configs_select_their_blocks(preset, blocks):
  """`--config lora:blocks=PRESET` trains factors only in the preset's blocks on SD 1.x."""
  import importlib.resources
  import importlib.util

  from persona_jax.methods import lora
  from persona_jax.train.config import run_config
  path = importlib.resources.files("persona_jax.configs") / "lora.py"
  spec = importlib.util.spec_from_file_location("lora_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  options = run_config(module.get_config(f"blocks={preset.lower()}")).method_options
  base = {"unet": abstract_params("unet", SD1)}
  chosen = lora.targets(lora.LoRAConfig(**dict(options, rank=8)), base, SD1)
  assert {bn.param_block(t.kernel, SD1) for t in chosen} == blocks
  assert {t.rank for t in chosen} == {8}
  # The same blocks as 17 numbers; kohya-style per-block ranks as 26 values.
  numbers = ",".join(str(v) for v in bn.LBW_PRESETS[preset])
  again = lora.targets(lora.LoRAConfig(blocks=numbers), base, SD1)
  assert [t.kernel for t in again] == [t.kernel for t in chosen]
  ranks = (0,) * 8 + (2,) + (0,) * 17                     # IN07 only, rank 2
  only = lora.targets(lora.LoRAConfig(block_ranks=ranks), base, SD1)
  assert {bn.param_block(t.kernel, SD1) for t in only} == {"IN07"} and {t.rank for t in only} == {2}
  with pytest.raises(ConfigError, match="method.block_ranks: 3 values"):
    lora.targets(lora.LoRAConfig(block_ranks=(1, 2, 3)), base, SD1)
  with pytest.raises(ConfigError, match="method.blocks: 'MIDDLE' is neither a preset"):
    lora.targets(lora.LoRAConfig(blocks="MIDDLE"), base, SD1)


# SDXL base 1.0's UNet layout (its block types and layers; narrower, with 2 transformer layers
# where it has 10, to trace quickly: block names do not depend on widths or depths).
SDXL = UNetConfig.from_dict(dict(
    block_out_channels=[32, 64, 128], layers_per_block=2, cross_attention_dim=64, norm_num_groups=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 2],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64))
# sd-webui-lora-block-weight scripts/lora_block_weight.py BLOCKID20 ("XL full") and BLOCKID12 ("XL").
BLOCKID20 = ["BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03",
             "OUT04", "OUT05"]


def test_sdxl_presets_are_the_extensions_xl_lists():
  mid = {"M00": "MID"}
  assert bn.preset("26", SDXL) == tuple(mid.get(b, b) for b in BLOCKID20)
  assert bn.preset("17", SDXL) == tuple(mid.get(b, b) for b in BLOCKID12)
  assert bn.param_block("text_encoder_2/encoder/layers_0/mlp/fc1/kernel", SDXL) == "BASE"
  twelve = bn.block_values(",".join(str(i + 1) for i in range(12)), SDXL, "blocks")
  assert twelve["OUT05"] == 12 and twelve["IN04"] == 2 and twelve["IN00"] == 0 and twelve["OUT06"] == 0
  with pytest.raises(ConfigError, match="'MIDD' is a preset over sd-webui-lora-block-weight's 17 SD "
                                        "1.x/2.x blocks.*give 20 or 12"):
    bn.block_values("MIDD", SDXL, "blocks")


def test_sdxl_blocks_agree_with_kohya_and_the_extension_on_sgm_names():
  """Every UNet kernel's block, against kohya's SDXL `get_block_index` (networks/lora.py: index
  into block_dims from the SGM name) and the extension's `diffusion_model_input_blocks_{i}_`
  match, both read off the kohya file names we write (lora_formats.kohya_names)."""
  from persona_jax.convert import lora_formats as lf
  unet = unet_params("SDXL")
  names = lf.kohya_names({"unet": unet, "text_encoder_2": {}})
  order = bn.kohya_order(SDXL)
  assert len(order) == 23 and order[10:13] == ("MID",) * 3
  kernels = [p for p in tree.paths(unet) if p.endswith("/kernel")]
  assert all(f"unet/{p}" in names for p in kernels)
  for path in kernels:
    block, rest = bn.unet_block(path, SDXL), names[f"unet/{path}"][len("lora_unet_"):]
    m = re.match(r"(input|middle|output)_blocks?_(\d+)_", rest)
    # kohya's get_block_index (is_sdxl): 0 the time/label embeddings, 22 the output head.
    kohya = ({"input": 1, "middle": 10, "output": 13}[m[1]] + int(m[2]) if m else
             22 if rest.startswith("out_") else 0)
    assert order[kohya] == block, (path, rest)
    lbw = m and {"input": f"IN{int(m[2]):02d}", "middle": "MID", "output": f"OUT{int(m[2]):02d}"}[m[1]]
    assert (lbw or None) == block, (path, rest)     # the extension's diffusion_model_*_blocks_{i}_
  ranks = bn.per_block((0, *range(1, 10), 7, 7, 7, *range(13, 22), 0), SDXL, "method.block_ranks")
  assert ranks["IN00"] == 1 and ranks["IN08"] == 9 and ranks["MID"] == 7 and ranks["OUT08"] == 21
  with pytest.raises(ConfigError, match="kohya's three middle_block values differ"):
    bn.per_block((0,) * 10 + (1, 2, 3) + (0,) * 10, SDXL, "method.block_ranks")
