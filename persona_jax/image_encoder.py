"""A transformers CLIP image-encoder folder (`CLIPVisionModel`, `CLIPVisionModelWithProjection`):
`config.json`, `model.safetensors` and optionally `preprocessor_config.json`; loading and saving.

Keys are read with or without the `vision_model.` prefix (transformers 5 writes CLIPVisionModel
without it, CLIPVisionModelWithProjection and transformers 4.x with it). Saving always writes the
prefix, which both transformers 4.x and 5.x load into either class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from persona_jax.convert import diffusers as convert
from persona_jax.convert.files import read_weights, write_json, write_safetensors
from persona_jax.data.clip_images import PROCESSOR_FILE, CLIPImageProcessorConfig
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.models.clip_vision import CLIPVisionModel
from persona_jax.models.configs import CLIPVisionConfig, read_json

CONFIG_FILE = "config.json"
WEIGHTS_STEM = "model"
WITH_PROJECTION = "CLIPVisionModelWithProjection"


def image_encoder_dir(image_encoder: str, tokenizer_dir) -> Path:
  """The image encoder a method uses: `image_encoder` (a method's `image_encoder` option) when
  set, else the base model's `image_encoder/` (the model is the folder holding `tokenizer_dir`)."""
  if image_encoder:
    return Path(image_encoder)
  model = Path(tokenizer_dir).parent if tokenizer_dir is not None else None
  if model is None or not (model / "model_index.json").is_file():
    raise ConfigError("method.image_encoder: set the CLIP image encoder folder (this base model "
                      "is not a diffusers folder that could hold image_encoder/)")
  if not (model / "image_encoder" / "config.json").is_file():
    raise ConfigError(f"method.image_encoder: {model} has no image_encoder/; pass a "
                      "CLIPVisionModel folder with --config.method.image_encoder=PATH")
  return model / "image_encoder"


@dataclasses.dataclass(frozen=True)
class MethodImageEncoder:
  """A method's CLIP image encoder: its folder, config, params and preprocessing settings."""
  folder: Path
  config: CLIPVisionConfig
  params: dict
  processor: CLIPImageProcessorConfig


def load_method_image_encoder(image_encoder: str, tokenizer_dir) -> MethodImageEncoder:
  """The image encoder of a method's `image_encoder` option (`image_encoder_dir`), loaded, with
  its preprocessor settings (CLIP's defaults at its image size when the folder has none)."""
  from persona_jax.data.clip_images import load_image_processor
  folder = image_encoder_dir(image_encoder, tokenizer_dir)
  config, params = load_image_encoder(folder)
  return MethodImageEncoder(folder, config, params, load_image_processor(folder, config.image_size))


def abstract_params(config: CLIPVisionConfig):
  """The param tree as shapes only (`jax.eval_shape`: nothing is initialized)."""
  s = config.image_size
  images = jnp.zeros((1, s, s, config.num_channels), config.dtype)
  return jax.eval_shape(CLIPVisionModel(config).init, jax.random.key(0), images)["params"]


def load_image_encoder(folder, *, dtype=jnp.float32, variant: str | None = None,
                       allow_pickle: bool = False, attention: str = "auto"):
  """Loads a CLIP image encoder folder.

  Args:
    folder: holds `config.json` and `model[.variant].safetensors`.
    dtype: dtype of params and computation.
    variant, allow_pickle, attention: as for `load_pipeline`.
  Returns:
    (CLIPVisionConfig, params) for `CLIPVisionModel(config).apply({"params": params}, images)`;
    `config.with_projection` is True when the weights hold `visual_projection`.
  Raises:
    ConfigError / ModelFileError naming the file (and key) that is missing or does not match.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise ModelFileError(f"{folder}: image encoder folder not found")
  raw = read_json(folder / CONFIG_FILE)
  config = CLIPVisionConfig.from_dict(raw, str(folder / CONFIG_FILE))
  state, source = read_weights(folder, WEIGHTS_STEM, variant, allow_pickle)
  with_projection = (WITH_PROJECTION in (raw.get("architectures") or ())
                     or any(k.startswith(convert.VISUAL_PROJECTION) for k in state))
  config = dataclasses.replace(config, with_projection=with_projection, dtype=dtype,
                               param_dtype=dtype, attention=attention)
  params = convert.state_dict_to_params(
      state, abstract_params(config), source=source, dtype=dtype,
      adapt=convert.image_encoder_adapt, ignore=convert.text_encoder_ignore)
  return config, jax.device_put(params)


def config_dict(config: CLIPVisionConfig) -> dict:
  """The config.json transformers writes for `config` (the fields persona_jax reads)."""
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if not f.metadata.get("runtime")}
  arch = WITH_PROJECTION if config.with_projection else "CLIPVisionModel"
  return {"architectures": [arch], "model_type": "clip_vision_model", **fields}


def save_image_encoder(folder, config: CLIPVisionConfig, params, *,
                       processor: CLIPImageProcessorConfig | None = None, dtype=None,
                       overwrite: bool = False) -> Path:
  """Writes `config.json`, `model.safetensors` (and `preprocessor_config.json` when `processor`
  is given) in transformers' layout. Existing files are an error unless `overwrite`."""
  folder = Path(folder)
  names = [CONFIG_FILE, f"{WEIGHTS_STEM}.safetensors"] + ([PROCESSOR_FILE] if processor else [])
  existing = [n for n in names if (folder / n).exists()]
  if existing and not overwrite:
    raise ModelFileError(f"{folder}: {existing[0]} exists; pass overwrite=True to replace it")
  state = convert.params_to_state_dict(params)
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  write_safetensors(folder / f"{WEIGHTS_STEM}.safetensors", state)
  write_json(folder / CONFIG_FILE, config_dict(config))
  if processor is not None:
    write_json(folder / PROCESSOR_FILE, processor.to_dict())
  return folder
