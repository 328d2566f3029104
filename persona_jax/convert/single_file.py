"""Original single-file SD 1.x / 2.x / SDXL checkpoints (LDM/CompVis/SGM key layout), in and
out (formats.md 3 and 4.5).

One `.safetensors` (or pickled `.ckpt`) holds the whole model:

  UNet          `model.diffusion_model.*` (input_blocks / middle_block / output_blocks; SDXL's
                added-conditioning MLP `label_emb.0.0` / `label_emb.0.2` = diffusers'
                `add_embedding.linear_1` / `linear_2`)
  VAE           `first_stage_model.*` (`vae.*` is read too); attention q/k/v/proj_out as
                (C, C, 1, 1) convs
  text encoder  SD 1.x: `cond_stage_model.transformer.text_model.*` (transformers' CLIP names)
                SD 2.x: `cond_stage_model.model.*` (OpenCLIP: fused `attn.in_proj_*`, `resblocks`,
                `ln_final`, ...). The file has one more text layer than the diffusers text encoder
                (SD 2.x conditions on the penultimate OpenCLIP layer), plus `text_projection` and
                `logit_scale`, which diffusers' CLIPTextModel does not have.
                SDXL: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, transformers'
                names) = text_encoder, and `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG) =
                text_encoder_2 (CLIPTextModelWithProjection), every layer of it, and its
                `text_projection`: OpenCLIP applies it as `x @ P`, so P (hidden, projection) is
                the transpose of the Linear weight. Only `logit_scale` (and CLIP-L's
                `position_ids`) are not in the diffusers model.

The name mapping is a table built from our own param tree and the diffusers configs
(`single_file_layout`): every diffusers key of each component gets its single-file key (and, for
OpenCLIP q/k/v, its third of the fused tensor). Import inverts that table and fails on any tensor
it cannot place and on any weight the file lacks; export applies it. Tensors a single file has
but the diffusers model does not (SD 2.x's extra OpenCLIP layer and `text_projection`,
`logit_scale`, `position_ids`, EMA copies, the DDPM schedule buffers) are kept as `extras`, and
the text-encoder ones are written back on export: A1111 and ComfyUI build SD 2.x's 24-layer
OpenCLIP from them. An SDXL file needs none of them (diffusers keeps every OpenCLIP layer), so any
SDXL pipeline can be written without a base file. EMA copies and schedule buffers are not written
(an EMA copy would be the base's, not the trained weights). Any other tensor is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.convert import diffusers as convert
from persona_jax.convert.files import (PICKLE_SUFFIXES, _read_pickle, check_weights, read_safetensors,
                                       write_safetensors)
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.models.configs import TextEncoderConfig, read_json
from persona_jax.convert.diffusers_folder import (SCHEDULER_FILE, Pipeline, is_sdxl_index,
                                                  model_index, parse_configs)
from persona_jax.convert.single_file_configs import (CLIP_PREFIX, CLIP_PREFIX_SHORT, FAMILIES,
                                                     OPENCLIP_PREFIX, VAE_PREFIX, VAE_PREFIX_ALT,
                                                     file_family, infer_configs)
from persona_jax.convert.single_file_layout import (COMPONENTS, SDXL_COMPONENTS,
                                                     cached_abstract_params, components, family,
                                                     key_tables, single_file_layout, typed_configs)
from persona_jax.tokenizer import load_tokenizer, shipped_tokenizer_dir, write_tokenizer

log = logging.getLogger(__name__)

# Tensors of original checkpoints that are not part of the diffusers model: kept as extras.
_DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "logvar", "lvlb_weights")
_EXTRA = re.compile(r"^(?:model_ema\..*|denoiser\.sigmas|" + "|".join(_DDPM_BUFFERS) + r"|"
                    r"cond_stage_model\.transformer\.(?:text_model\.)?embeddings\.position_ids|"
                    r"cond_stage_model\.model\.(?:text_projection|logit_scale|attn_mask)|"
                    r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.position_ids|"
                    r"conditioner\.embedders\.1\.model\.(?:logit_scale|attn_mask))$")
# Text-encoder extras, written back on export (schedule buffers and EMA copies are not).
_TEXT_EXTRA_PREFIXES = ("cond_stage_model.", "conditioner.")

@dataclasses.dataclass
class SingleFilePipeline(Pipeline):
  """A Pipeline read from a single file; `extras` = the file's tensors the diffusers model has no
  place for, by their single-file keys (written back by `save_single_file`)."""
  extras: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Single file -> diffusers state dicts.


def _normalize(key: str, vae_alt: bool) -> str:
  """The canonical spelling of a file key (`vae.` VAE prefix, CLIP without `text_model.`)."""
  if vae_alt and key.startswith(VAE_PREFIX_ALT):
    return VAE_PREFIX + key[len(VAE_PREFIX_ALT):]
  if key.startswith(CLIP_PREFIX_SHORT) and not key.startswith(CLIP_PREFIX):
    return CLIP_PREFIX + key[len(CLIP_PREFIX_SHORT):]
  return key


def _is_extra(key: str, text_layers: int | None) -> bool:
  """Tensors a single file may hold that the diffusers model does not: see `_EXTRA`, and (SD
  2.x: `text_layers` = the diffusers text encoder's) the OpenCLIP layer after the last one the
  diffusers text encoder keeps."""
  return bool(_EXTRA.match(key) or text_layers is not None and key.startswith(
      f"{OPENCLIP_PREFIX}transformer.resblocks.{text_layers}."))


def _sd2_text_layers(configs: dict) -> int | None:
  """The SD 2.x text encoder's layer count (the file has one more), None for other families."""
  return configs["text_encoder"].num_hidden_layers if family(configs) == "openclip" else None


def _check_family(tensors, configs: dict, source: str) -> None:
  have, want = file_family(tensors, source), family(configs)
  if have != want:
    raise ConfigError(f"{source} is an {FAMILIES[have]} checkpoint but the configs describe an "
                      f"{FAMILIES[want]} model; pass a config folder of the same family")


def split_single_file(tensors: Mapping[str, np.ndarray], configs: Mapping, *,
                      source: str = "single file") -> tuple[dict, dict]:
  """(state dicts, extras): `state_dict_from_single_file`'s result, and the file's tensors the
  diffusers model has no place for, under their own keys."""
  configs = typed_configs(configs)
  _check_family(tensors, configs, source)
  tables = key_tables(configs)
  layout = single_file_layout(configs, tables)
  inverse: dict[str, list] = {}
  for comp, slots in layout.items():
    for dkey, slot in slots.items():
      inverse.setdefault(slot.key, []).append((comp, dkey, slot))
  vae_alt = not any(k.startswith(VAE_PREFIX) for k in tensors)
  text_layers = _sd2_text_layers(configs)
  out = {comp: {} for comp in layout}
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
      elif slot.transposed:
        file_shape = want[::-1]
      if tuple(np.shape(w)) != file_shape:
        raise ModelFileError(f"{source}: tensor '{key}' has shape {tuple(np.shape(w))}, the "
                             f"config needs {file_shape}; are the configs from the same model?")
      if slot.part is not None:
        d = want[0]
        w_part = w[slot.part * d:(slot.part + 1) * d]
      elif slot.conv1x1 and np.ndim(w) == 4:
        w_part = w[:, :, 0, 0]
      elif slot.transposed:
        w_part = np.ascontiguousarray(np.asarray(w).T)
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
  """{"unet": ..., "text_encoder": ..., "vae": ...} (+ "text_encoder_2" for SDXL):
  diffusers-named state dicts (PyTorch layouts; text encoder keys without `text_model.`) of a
  single file's tensors.

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
  """The reverse of `state_dict_from_single_file` (without extras): fuses OpenCLIP q/k/v,
  writes the VAE attention weights as (C, C, 1, 1) and SDXL's OpenCLIP text_projection as the
  (hidden, projection) matrix."""
  layout = single_file_layout(configs)
  out, fused = {}, {}
  for comp in layout:
    prefix = convert.TEXT_MODEL_PREFIX if comp.startswith("text_encoder") else None
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v
             for k, v in state_dicts[comp].items()}
    for dkey, slot in layout[comp].items():
      w = np.asarray(state[dkey])
      if slot.part is not None:
        fused.setdefault(slot.key, [None, None, None])[slot.part] = w
      elif slot.transposed:
        out[slot.key] = np.ascontiguousarray(w.T)
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
  """Writes `pipe` as one original-layout (LDM; SDXL: SGM) `.safetensors` file with
  `{"format": "pt"}`.

  SD 2.x files carry the base's OpenCLIP text layer that diffusers drops, and its
  `text_projection`, unchanged: from `base_single_file` (the single file the base model came
  from) or, for a pipeline read by `load_single_file`, from its `extras`. SDXL files need nothing
  from a base (diffusers keeps all of OpenCLIP ViT-bigG and its projection); text-encoder extras
  (`logit_scale`, `position_ids`) are carried when the pipeline or the base file has them.

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
  configs = typed_configs({"unet": pipe.unet_config, "text_encoder": pipe.text_encoder_config,
                    "vae": pipe.vae_config, "text_encoder_2": pipe.text_encoder_2_config})
  fmt = family(configs)
  layers = _sd2_text_layers(configs)
  carried = lambda k: k.startswith(_TEXT_EXTRA_PREFIXES) and _is_extra(k, layers)   # noqa: E731
  if base_single_file is not None:
    base = Path(base_single_file)
    extras = _read_tensors(base, allow_pickle, keys=carried)
    source = str(base)
  else:
    extras = {k: v for k, v in getattr(pipe, "extras", {}).items() if carried(k)}
    source = f"{pipe.path} (extras)"
  text_prefix = {"clip": CLIP_PREFIX_SHORT, "openclip": OPENCLIP_PREFIX,
                 "sdxl": "conditioner.embedders."}[fmt]
  foreign = next((k for k in extras if not k.startswith(text_prefix)), None)
  if foreign is not None:
    raise ModelFileError(f"{source}: '{foreign}' is not a tensor of an {FAMILIES[fmt]} single "
                         "file; is it the base model's single file?")
  if fmt == "openclip":
    _check_openclip_extras(extras, configs["text_encoder"], source, given=base_single_file)
  state = {name: convert.params_to_state_dict(pipe.params[name]) for name in components(configs)}
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
  """The raw configs of a diffusers folder (an SDXL one, by its model_index.json or its
  text_encoder_2/, with text_encoder_2's)."""
  if not config_dir.is_dir():
    raise ModelFileError(f"{config_dir}: config folder not found (a diffusers model folder of the "
                         "same architecture as the single file)")
  raw = {"scheduler": read_json(config_dir / SCHEDULER_FILE)}
  index = config_dir / "model_index.json"
  if index.is_file():
    raw["model_index"] = read_json(index)
    sdxl = is_sdxl_index(raw["model_index"])
  else:
    sdxl = (config_dir / "text_encoder_2" / "config.json").is_file()
    raw["model_index"] = model_index(raw["scheduler"].get("_class_name", "DDIMScheduler"),
                                     sdxl=sdxl)
  for name in SDXL_COMPONENTS if sdxl else COMPONENTS:
    raw[name] = read_json(config_dir / name / "config.json")
  return raw


def default_tokenizer_dir(fmt: str) -> Path:
  """The SD 1.x tokenizer we ship; for SD 2.x (and SDXL's tokenizer_2: "openclip") the same
  vocabulary padded with "!" (id 0), written once into the user cache."""
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
  """Loads an original SD 1.x/2.x or SDXL base single-file checkpoint (`.safetensors`; `.ckpt`
  with allow_pickle).

  Args:
    path: the file.
    config_dir: a diffusers folder of the same architecture (e.g. the model the file was made
      from): its configs (head counts, block types, sample size, scheduler) and tokenizer(s) are
      used. Without it, a standard SD 1.x/2.x/SDXL base architecture is inferred from the tensor
      shapes, which needs `prediction_type` (a file does not record it). SDXL tokenizers then
      are the shipped CLIP one and the same padded with "!" (as stable-diffusion-xl-base-1.0's).
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
        "architecture, or, for a standard SD 1.x/2.x/SDXL base model, prediction_type= "
        "(--prediction-type epsilon|v_prediction; SD 2.x 768 models use v_prediction, SD 1.x "
        "and the SDXL base epsilon)")
  tensors = _read_tensors(path, allow_pickle)
  source = str(path)
  fmt = file_family(tensors, source)
  # Tokenizer folders: the config folder's, else ours of the same padding (by `fmt`).
  wanted = {"tokenizer": "openclip" if fmt == "openclip" else "clip"}
  if fmt == "sdxl":
    wanted["tokenizer_2"] = "openclip"
  if config_dir is not None:
    config_dir = Path(config_dir)
    raw = _read_config_dir(config_dir)
    root = f"{config_dir}/"
  else:
    raw = infer_configs(tensors, prediction_type, source=source)
    root = f"{path} (inferred) "
  tokenizers = {name: config_dir / name if config_dir is not None and (config_dir / name).is_dir()
                else default_tokenizer_dir(kind) for name, kind in wanted.items()}
  if prediction_type is not None:
    raw["scheduler"] = {**raw["scheduler"], "prediction_type": prediction_type}
  configs = parse_configs(raw, dtype=dtype, attention=attention, root=root)
  typed = typed_configs(configs)
  state, extras = split_single_file(tensors, typed, source=source)
  del tensors
  params = {name: convert.state_dict_to_params(state[name], cached_abstract_params(name, typed[name]),
                                               source=source, dtype=dtype)
            for name in components(typed)}
  for folder in tokenizers.values():
    load_tokenizer(folder)   # fail now, naming the folder, rather than at first use
  return SingleFilePipeline(**configs, params=jax.device_put(params),
                            tokenizer_dir=tokenizers["tokenizer"],
                            tokenizer_2_dir=tokenizers.get("tokenizer_2"), raw_configs=raw,
                            path=path, extras=extras)
