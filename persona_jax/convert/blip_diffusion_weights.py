"""BLIP-Diffusion's network folders <-> our params: `qformer/` (diffusers' deprecated
Blip2QFormerModel, its vision tower included) and `text_encoder/` (ContextCLIPTextModel, whose
keys are CLIPTextModel's), read strictly from safetensors.

The Q-Former's keys are our param paths by the key table of `convert/diffusers.py` (Dense
kernels transposed, the patch conv OIHW <-> HWIO, LayerNorm `weight` <-> `scale`, the bare
`query_tokens`, `class_embedding` and `position_embedding` as they are), with one rename: the
Q-Former's layers are `encoder.layer.N` in torch and `encoder/layer_N` here (`layer` is not one
of the key table's list containers, to leave other models' names alone). The `position_ids`
buffer is skipped. Any missing or unexpected tensor, or a wrong shape, is a one-line
ModelFileError naming the file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from persona_jax.convert import diffusers as convert
from persona_jax.convert.files import read_weights
from persona_jax.errors import ModelFileError
from persona_jax.models.blip2 import Blip2QFormerModel
from persona_jax.models.blip2_config import Blip2Config
from persona_jax.models.components import abstract_params as component_abstract_params
from persona_jax.models.configs import TextEncoderConfig, read_json

CONFIG_FILE = "config.json"
WEIGHTS_STEM = "model"                        # transformers' save_pretrained: model.safetensors
_TORCH_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_OUR_LAYER = re.compile(r"^encoder\.layer_(\d+)\.")


def qformer_abstract_params(config: Blip2Config):
  """The Q-Former's param tree as shapes only (nothing is initialized)."""
  s = config.vision_config.image_size
  images = jnp.zeros((1, s, s, 3), config.vision_config.dtype)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(Blip2QFormerModel(config).init, jax.random.key(0), images, ids)["params"]


def _qformer_adapt(key, w, table):
  """diffusers' `encoder.layer.N.` -> our `encoder.layer_N.`."""
  renamed = _TORCH_LAYER.sub(r"encoder.layer_\1.", key)
  return (renamed, w) if renamed != key else None


def _qformer_ignore(key: str) -> bool:
  return key == "embeddings.position_ids"


def _folder(folder, what: str) -> Path:
  folder = Path(folder)
  if not folder.is_dir():
    raise ModelFileError(f"{folder}: {what} folder not found")
  return folder


def qformer_params(state, config: Blip2Config, *, source: str, dtype=None):
  """A Blip2QFormerModel state dict {torch key: array} -> our params (strict)."""
  return convert.state_dict_to_params(state, qformer_abstract_params(config), source=source,
                                      dtype=dtype, adapt=_qformer_adapt, ignore=_qformer_ignore)


def qformer_state_dict(params) -> dict:
  """Our Q-Former params -> diffusers' Blip2QFormerModel keys and layouts (numpy)."""
  state = convert.params_to_state_dict(params)
  return {_OUR_LAYER.sub(r"encoder.layer.\1.", k): v for k, v in state.items()}


def load_qformer(folder, *, dtype=jnp.float32, attention: str = "auto", variant: str | None = None,
                 allow_pickle: bool = False) -> tuple[Blip2Config, dict]:
  """Reads a `qformer/` folder (config.json with Blip2Config, model.safetensors).

  Returns:
    (Blip2Config, params) for `Blip2QFormerModel(config).apply({"params": params}, images, ids)`.
  Raises:
    ConfigError / ModelFileError naming the file (and key) that is missing or does not match.
  """
  folder = _folder(folder, "Q-Former")
  config = Blip2Config.from_dict(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
  config = config.with_dtype(dtype, attention)
  state, source = read_weights(folder, WEIGHTS_STEM, variant, allow_pickle)
  return config, jax.device_put(qformer_params(state, config, source=source, dtype=dtype))


def load_context_text_encoder(folder, *, dtype=jnp.float32, attention: str = "auto",
                              variant: str | None = None,
                              allow_pickle: bool = False) -> tuple[TextEncoderConfig, dict]:
  """Reads a `text_encoder/` folder (ContextCLIPTextModel: CLIPTextModel's config and keys).

  Returns:
    (TextEncoderConfig, params) for `ContextCLIPTextModel(config).apply({"params": params}, ...)`.
  """
  folder = _folder(folder, "context text encoder")
  config = TextEncoderConfig.from_dict(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
  config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype, attention=attention)
  state, source = read_weights(folder, WEIGHTS_STEM, variant, allow_pickle)
  params = convert.state_dict_to_params(
      state, component_abstract_params("text_encoder", config), source=source, dtype=dtype,
      adapt=convert.text_encoder_adapt, ignore=convert.text_encoder_ignore)
  return config, jax.device_put(params)
