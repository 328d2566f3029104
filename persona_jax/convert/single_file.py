"""Original single-file SD 1.x / 2.x checkpoints (LDM/CompVis key layout), in and out
(formats.md 3 and 4.5).

One `.safetensors` (or pickled `.ckpt`) holds the whole model:

  UNet          `model.diffusion_model.*` (input_blocks / middle_block / output_blocks)
  VAE           `first_stage_model.*` (`vae.*` is read too); attention q/k/v/proj_out as
                (C, C, 1, 1) convs
  text encoder  SD 1.x: `cond_stage_model.transformer.text_model.*` (transformers' CLIP names)
                SD 2.x: `cond_stage_model.model.*` (OpenCLIP: fused `attn.in_proj_*`, `resblocks`,
                `ln_final`, ...). The file has one more text layer than the diffusers text encoder
                (SD 2.x conditions on the penultimate OpenCLIP layer), plus `text_projection` and
                `logit_scale`, which diffusers' CLIPTextModel does not have.

The name mapping is a table built from our own param tree and the diffusers configs
(`single_file_layout`): every diffusers key of each component gets its single-file key (and, for
OpenCLIP q/k/v, its third of the fused tensor). Import inverts that table and fails on any tensor
it cannot place and on any weight the file lacks; export applies it. Tensors a single file has
but the diffusers model does not (the extra OpenCLIP layer, `text_projection`, `logit_scale`,
`position_ids`, EMA copies, the DDPM schedule buffers) are kept as `extras`, and the text-encoder
ones are written back on export: A1111 and ComfyUI build SD 2.x's 24-layer OpenCLIP from them.
EMA copies and schedule buffers are not written (an EMA copy would be the base's, not the
trained weights). Any other tensor is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.convert import diffusers as convert
from persona_jax.convert.diffusers import key_table
from persona_jax.convert.files import (PICKLE_SUFFIXES, _read_pickle, check_weights, read_safetensors,
                                       write_safetensors)
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.models.configs import TextEncoderConfig, UNetConfig, VAEConfig, read_json
from persona_jax.convert.diffusers_folder import SCHEDULER_FILE, Pipeline, model_index, parse_configs
from persona_jax.convert.single_file_configs import (CLIP_PREFIX, CLIP_PREFIX_SHORT,
                                                     OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
                                                     VAE_PREFIX_ALT, file_text_format,
                                                     infer_configs)
from persona_jax.models.components import abstract_params
from persona_jax.tokenizer import load_tokenizer, shipped_tokenizer_dir, write_tokenizer

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "vae")

# Tensors of original checkpoints that are not part of the diffusers model: kept as extras.
_DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "logvar", "lvlb_weights")
_EXTRA = re.compile(r"^(?:model_ema\..*|" + "|".join(_DDPM_BUFFERS) + r"|"
                    r"cond_stage_model\.transformer\.(?:text_model\.)?embeddings\.position_ids|"
                    r"cond_stage_model\.model\.(?:text_projection|logit_scale|attn_mask))$")

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


@dataclasses.dataclass
class SingleFilePipeline(Pipeline):
  """A Pipeline read from a single file; `extras` = the file's tensors the diffusers model has no
  place for, by their single-file keys (written back by `save_single_file`)."""
  extras: dict = dataclasses.field(default_factory=dict)


def text_format(text_encoder_config: TextEncoderConfig) -> str:
  """'openclip' (SD 2.x: OpenCLIP ViT-H, gelu) or 'clip' (SD 1.x: OpenAI CLIP, quick_gelu)."""
  return "openclip" if text_encoder_config.hidden_act == "gelu" else "clip"


def _typed(configs: Mapping) -> dict:
  """{"unet": UNetConfig, "text_encoder": ..., "vae": ...} from typed or raw JSON configs, keyed
  by component name or as `parse_configs` returns them (`unet_config`, ...)."""
  classes = {"unet": UNetConfig, "text_encoder": TextEncoderConfig, "vae": VAEConfig}
  out = {}
  for name, cls in classes.items():
    c = configs[name] if name in configs else configs[f"{name}_config"]
    out[name] = cls.from_dict(c, f"{name}/config.json") if isinstance(c, Mapping) else c
  return out


# ---------------------------------------------------------------------------------------------
# The name table.


def _by_prefix(keys, prefixes: Mapping[str, tuple[str, Mapping | None]], head: str) -> dict:
  """Maps diffusers keys by their longest listed prefix; `rename` maps the next part of the key."""
  ordered = sorted(prefixes, key=len, reverse=True)
  out = {}
  for key in keys:
    prefix = next((p for p in ordered if key.startswith(p)), None)
    if prefix is None:
      raise ConfigError(f"no single-file name for {key}: this UNet has parts an SD 1.x/2.x "
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
              "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET)}
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


def _text_slots(config: TextEncoderConfig, keys) -> dict[str, Slot]:
  if text_format(config) == "clip":
    return {key: Slot(CLIP_PREFIX + key) for key in keys}
  fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
  out = {}
  for key in keys:
    if key in fixed:
      out[key] = Slot(OPENCLIP_PREFIX + fixed[key])
      continue
    m = re.match(r"^encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key)
    if m is None:
      raise ConfigError(f"no OpenCLIP single-file name for text encoder tensor {key}")
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{m[1]}."
    qkv = re.match(r"^self_attn\.([qkv]_proj)$", m[2])
    if qkv:
      out[key] = Slot(f"{block}attn.in_proj_{m[3]}", part=_QKV[qkv[1]])
    else:
      out[key] = Slot(f"{block}{_OPENCLIP_LAYER[m[2]]}.{m[3]}")
  return out


@functools.lru_cache(maxsize=16)
def _abstract(name: str, config):
  """`abstract_params`, once per config (configs are frozen dataclasses); callers only read it."""
  return abstract_params(name, config)


def key_tables(configs: Mapping) -> dict:
  """{component: convert.key_table} of the model the configs describe (shapes only)."""
  configs = _typed(configs)
  return {name: key_table(_abstract(name, configs[name])) for name in COMPONENTS}


def single_file_layout(configs: Mapping, tables: Mapping | None = None) -> dict[str, dict[str, Slot]]:
  """{component: {diffusers key: Slot}} for the model the configs describe (text encoder keys
  without transformers' `text_model.` prefix, as `convert.key_table` names them). `tables`:
  `key_tables(configs)` when the caller has them already."""
  configs = _typed(configs)
  tables = tables or key_tables(configs)
  slots = {"unet": _unet_slots, "text_encoder": _text_slots, "vae": _vae_slots}
  return {name: slots[name](configs[name], tables[name]) for name in COMPONENTS}


# ---------------------------------------------------------------------------------------------
# Single file -> diffusers state dicts.


def _normalize(key: str, vae_alt: bool) -> str:
  """The canonical spelling of a file key (`vae.` VAE prefix, CLIP without `text_model.`)."""
  if vae_alt and key.startswith(VAE_PREFIX_ALT):
    return VAE_PREFIX + key[len(VAE_PREFIX_ALT):]
  if key.startswith(CLIP_PREFIX_SHORT) and not key.startswith(CLIP_PREFIX):
    return CLIP_PREFIX + key[len(CLIP_PREFIX_SHORT):]
  return key


def _is_extra(key: str, text_layers: int) -> bool:
  """Tensors a single file may hold that the diffusers model does not: see `_EXTRA`, and the
  OpenCLIP layer after the last one the diffusers text encoder keeps."""
  return bool(_EXTRA.match(key) or key.startswith(
      f"{OPENCLIP_PREFIX}transformer.resblocks.{text_layers}."))


def _check_family(tensors, configs: dict, source: str) -> None:
  have, want = file_text_format(tensors, source), text_format(configs["text_encoder"])
  if have != want:
    family = {"clip": "SD 1.x (CLIP text encoder)", "openclip": "SD 2.x (OpenCLIP text encoder)"}
    raise ConfigError(f"{source} is an {family[have]} checkpoint but the configs describe an "
                      f"{family[want]} model; pass a config folder of the same family")


def split_single_file(tensors: Mapping[str, np.ndarray], configs: Mapping, *,
                      source: str = "single file") -> tuple[dict, dict]:
  """(state dicts, extras): `state_dict_from_single_file`'s result, and the file's tensors the
  diffusers model has no place for, under their own keys."""
  configs = _typed(configs)
  _check_family(tensors, configs, source)
  tables = key_tables(configs)
  layout = single_file_layout(configs, tables)
  inverse: dict[str, list] = {}
  for comp, slots in layout.items():
    for dkey, slot in slots.items():
      inverse.setdefault(slot.key, []).append((comp, dkey, slot))
  vae_alt = not any(k.startswith(VAE_PREFIX) for k in tensors)
  text_layers = configs["text_encoder"].num_hidden_layers
  out = {comp: {} for comp in COMPONENTS}
  extras, unexpected = {}, []
  for key, w in tensors.items():
    targets = inverse.get(_normalize(key, vae_alt))
    if targets is None:
      if _is_extra(key, text_layers):
        extras[key] = w
      else:
        unexpected.append(key)
      continue
    for comp, dkey, slot in targets:
      want = tables[comp][dkey].torch_shape()
      file_shape = want
      if slot.part is not None:
        file_shape = (3 * want[0], *want[1:])
      elif slot.conv1x1 and np.ndim(w) == 4:
        file_shape = (*want, 1, 1)
      if tuple(np.shape(w)) != file_shape:
        raise ModelFileError(f"{source}: tensor '{key}' has shape {tuple(np.shape(w))}, the "
                             f"config needs {file_shape}; are the configs from the same model?")
      if slot.part is not None:
        d = want[0]
        w_part = w[slot.part * d:(slot.part + 1) * d]
      elif slot.conv1x1 and np.ndim(w) == 4:
        w_part = w[:, :, 0, 0]
      else:
        w_part = w
      out[comp][dkey] = w_part
  if unexpected:
    raise ModelFileError(f"{source}: {len(unexpected)} tensor(s) that do not belong to this SD "
                         f"model, e.g. '{unexpected[0]}'"
                         + (f", '{unexpected[1]}'" if len(unexpected) > 1 else "")
                         + "; is it a checkpoint of the same architecture as the configs?")
  missing = [slot.key for comp, slots in layout.items() for dkey, slot in slots.items()
             if dkey not in out[comp]]
  if missing:
    missing = list(dict.fromkeys(missing))
    raise ModelFileError(f"{source}: {len(missing)} tensor(s) missing, e.g. '{missing[0]}'"
                         + (f", '{missing[1]}'" if len(missing) > 1 else "")
                         + "; the file does not match the configs")
  return out, extras


def state_dict_from_single_file(tensors: Mapping[str, np.ndarray], configs: Mapping, *,
                                source: str = "single file") -> dict[str, dict[str, np.ndarray]]:
  """{"unet": ..., "text_encoder": ..., "vae": ...}: diffusers-named state dicts (PyTorch
  layouts; text encoder keys without `text_model.`) of a single file's tensors.

  Args:
    tensors: {single-file key: array}.
    configs: the diffusers configs of the model (typed, raw JSON, or `parse_configs`' dict);
      layers_per_block and the block types fix the UNet block numbering.
    source: the file, for error messages.
  Raises:
    ModelFileError naming the source and the first tensor that does not map, is missing or has
    the wrong shape; ConfigError if file and configs are of different SD families.
  """
  return split_single_file(tensors, configs, source=source)[0]


# ---------------------------------------------------------------------------------------------
# Diffusers state dicts -> single file.


def state_dict_to_single_file(state_dicts: Mapping[str, Mapping[str, np.ndarray]],
                              configs: Mapping) -> dict[str, np.ndarray]:
  """The reverse of `state_dict_from_single_file` (without extras): fuses OpenCLIP q/k/v and
  writes the VAE attention weights as (C, C, 1, 1)."""
  layout = single_file_layout(configs)
  out, fused = {}, {}
  for comp in COMPONENTS:
    prefix = convert.TEXT_MODEL_PREFIX if comp == "text_encoder" else None
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v
             for k, v in state_dicts[comp].items()}
    for dkey, slot in layout[comp].items():
      w = np.asarray(state[dkey])
      if slot.part is not None:
        fused.setdefault(slot.key, [None, None, None])[slot.part] = w
      else:
        out[slot.key] = w[:, :, None, None] if slot.conv1x1 else w
  for key, parts in fused.items():
    out[key] = np.concatenate(parts, axis=0)
  return out


def _read_tensors(path: Path, allow_pickle: bool, keys=None) -> dict[str, np.ndarray]:
  """A single file's tensors; with `keys` (a predicate on names) only those it accepts."""
  if not path.is_file():
    raise ModelFileError(f"{path}: file not found")
  if path.suffix in PICKLE_SUFFIXES:
    tensors = _read_pickle(path, allow_pickle)
    return check_weights({k: v for k, v in tensors.items() if keys is None or keys(k)}, path,
                         finite=False)
  if path.suffix != ".safetensors":
    raise ModelFileError(f"{path}: expected a .safetensors single-file checkpoint (or a pickled "
                         ".ckpt with allow_pickle=True)")
  if keys is None:
    return check_weights(read_safetensors(path), path, finite=False)
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="numpy") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys() if keys(k)}
  except Exception as e:  # safetensors raises its own error types for truncated/garbled files
    raise ModelFileError(f"{path}: cannot read safetensors file ({e})") from None
  return check_weights(tensors, path, finite=False)


def save_single_file(pipe: Pipeline, path, *, base_single_file=None, dtype=np.float32,
                     allow_pickle: bool = False) -> Path:
  """Writes `pipe` as one original-layout (LDM) `.safetensors` file with `{"format": "pt"}`.

  SD 2.x files carry the base's OpenCLIP text layer that diffusers drops, and its
  `text_projection`, unchanged: from `base_single_file` (the single file the base model came
  from) or, for a pipeline read by `load_single_file`, from its `extras`.

  Args:
    pipe: the pipeline (its params are written; untrained components are the base's).
    path: the output file (written atomically; an existing file is replaced).
    base_single_file: the base model's original single file (.safetensors; .ckpt with
      allow_pickle). Its text-encoder extras are copied. Needed for SD 2.x unless `pipe` came
      from a single file.
    dtype: np.float32 (default) or np.float16 for the floating tensors.
  Raises:
    ConfigError for an SD 2.x model without the base's single file; ModelFileError when the base
    file does not fit the model.
  """
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ConfigError(f"{path}: single files are written as .safetensors; name it "
                      f"{path.with_suffix('.safetensors').name}")
  configs = _typed({"unet": pipe.unet_config, "text_encoder": pipe.text_encoder_config,
                    "vae": pipe.vae_config})
  fmt = text_format(configs["text_encoder"])
  layers = configs["text_encoder"].num_hidden_layers
  carried = lambda k: k.startswith("cond_stage_model.") and _is_extra(k, layers)   # noqa: E731
  if base_single_file is not None:
    base = Path(base_single_file)
    extras = _read_tensors(base, allow_pickle, keys=carried)
    source = str(base)
  else:
    extras = {k: v for k, v in getattr(pipe, "extras", {}).items() if carried(k)}
    source = f"{pipe.path} (extras)"
  if fmt == "openclip":
    _check_openclip_extras(extras, configs["text_encoder"], source, given=base_single_file)
  state = {name: convert.params_to_state_dict(pipe.params[name]) for name in COMPONENTS}
  tensors = state_dict_to_single_file(state, configs)
  tensors.update(extras)
  tensors = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v   # bf16 too
             for k, v in ((k, np.asarray(v)) for k, v in tensors.items())}
  write_safetensors(path, tensors, {"format": "pt"})
  return path


def _check_openclip_extras(extras: dict, config: TextEncoderConfig, source: str, given) -> None:
  layer = f"{OPENCLIP_PREFIX}transformer.resblocks.{config.num_hidden_layers}."
  projection = f"{OPENCLIP_PREFIX}text_projection"
  if not any(k.startswith(layer) for k in extras) or projection not in extras:
    if given is None:
      raise ConfigError(
          "an SD 2.x single file holds the base model's last OpenCLIP text layer and "
          "text_projection, which diffusers folders drop; pass base_single_file= (`persona-jax "
          "export --base-single-file FILE`: the original .safetensors single file the base model "
          "came from), or export a diffusers folder instead")
    raise ModelFileError(f"{source}: no '{layer}*' and '{projection}' tensors; it is not the "
                         f"original SD 2.x single file of a model with {config.num_hidden_layers} "
                         "text layers (+1)")
  width = config.hidden_size
  ln = extras.get(f"{layer}ln_1.weight")
  if ln is None or ln.shape != (width,) or extras[projection].shape[0] != width:
    raise ModelFileError(f"{source}: its text layers are not {width} wide like this model's; "
                         "is it the base model's single file?")


# ---------------------------------------------------------------------------------------------
# Loading.


def _read_config_dir(config_dir: Path) -> dict:
  if not config_dir.is_dir():
    raise ModelFileError(f"{config_dir}: config folder not found (a diffusers model folder of the "
                         "same architecture as the single file)")
  raw = {"scheduler": read_json(config_dir / SCHEDULER_FILE)}
  for name in COMPONENTS:
    raw[name] = read_json(config_dir / name / "config.json")
  index = config_dir / "model_index.json"
  raw["model_index"] = read_json(index) if index.is_file() else model_index(
      raw["scheduler"].get("_class_name", "DDIMScheduler"))
  return raw


def default_tokenizer_dir(fmt: str) -> Path:
  """The SD 1.x tokenizer we ship; for SD 2.x the same vocabulary padded with "!" (id 0), written
  once into the user cache."""
  if fmt == "clip":
    return shipped_tokenizer_dir()
  from persona_jax.cache import cache_dir
  folder = cache_dir() / "tokenizers" / "sd2-openclip"
  if not (folder / "tokenizer_config.json").is_file():
    write_tokenizer(folder, "sd2")
  return folder


def load_single_file(path, *, config_dir=None, prediction_type: str | None = None,
                     dtype=jnp.float32, allow_pickle: bool = False,
                     attention: str = "auto") -> SingleFilePipeline:
  """Loads an original SD 1.x/2.x single-file checkpoint (`.safetensors`; `.ckpt` with
  allow_pickle).

  Args:
    path: the file.
    config_dir: a diffusers folder of the same architecture (e.g. the model the file was made
      from): its configs (head counts, block types, sample size, scheduler) and tokenizer are
      used. Without it, a standard SD 1.x/2.x architecture is inferred from the tensor shapes,
      which needs `prediction_type` (a file does not record it).
    prediction_type: "epsilon" or "v_prediction" (SD 2.x 768-v models); overrides config_dir's.
    dtype, attention: as in `load_pipeline`.
    allow_pickle: read a pickled `.ckpt` (with torch). Only for files you trust.
  Returns:
    a SingleFilePipeline; `extras` holds the file's tensors the diffusers model has no place for.
  Raises:
    ConfigError when neither config_dir nor prediction_type is given (saying what to pass) or
    when they do not fit the file; ModelFileError naming the file and the first tensor that does
    not map or is missing; PickleRefusedError for a pickle without allow_pickle.
  """
  path = Path(path)
  if config_dir is None and prediction_type is None:
    if not path.is_file():
      raise ModelFileError(f"{path}: file not found")
    raise ConfigError(
        f"{path}: a single-file checkpoint does not record its attention head counts or its "
        "prediction type; pass config_dir= (--config DIR), a diffusers folder of the same "
        "architecture, or, for a standard SD 1.x/2.x model, prediction_type= "
        "(--prediction-type epsilon|v_prediction; SD 2.x 768 models use v_prediction)")
  tensors = _read_tensors(path, allow_pickle)
  source = str(path)
  fmt = file_text_format(tensors, source)
  if config_dir is not None:
    config_dir = Path(config_dir)
    raw = _read_config_dir(config_dir)
    root = f"{config_dir}/"
    tokenizer_dir = config_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
      tokenizer_dir = default_tokenizer_dir(fmt)
  else:
    raw = infer_configs(tensors, prediction_type, source=source)
    root = f"{path} (inferred) "
    tokenizer_dir = default_tokenizer_dir(fmt)
  if prediction_type is not None:
    raw["scheduler"] = {**raw["scheduler"], "prediction_type": prediction_type}
  configs = parse_configs(raw, dtype=dtype, attention=attention, root=root)
  typed = _typed(configs)
  state, extras = split_single_file(tensors, typed, source=source)
  del tensors
  params = {name: convert.state_dict_to_params(state[name], _abstract(name, typed[name]),
                                               source=source, dtype=dtype)
            for name in COMPONENTS}
  load_tokenizer(tokenizer_dir)
  return SingleFilePipeline(**configs, params=jax.device_put(params), tokenizer_dir=tokenizer_dir,
                            raw_configs=raw, path=path, extras=extras)
