"""The networks of a Stable Diffusion pipeline as one bundle, and their parameter trees.

`SDModels` is the static half (module objects, hashable: a static argument of every jitted
function); params always travel separately, as `{"unet": ..., "text_encoder": ..., "vae": ...}`
(plus whatever side networks a method brings, e.g. `image_encoder`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from persona_jax.models.text_encoder import CLIPTextModel
from persona_jax.models.unet import UNet2DConditionModel
from persona_jax.models.vae import AutoencoderKL

COMPONENT_NAMES = ("unet", "text_encoder", "vae")


class SDModels(NamedTuple):
  """The three networks of a pipeline (static module objects; params come separately)."""
  unet: UNet2DConditionModel
  text_encoder: CLIPTextModel
  vae: AutoencoderKL


def component_model(name: str, config):
  """(module, example inputs) of a pipeline component, for creating its params."""
  if name == "unet":
    f = config.downsample_factor
    return UNet2DConditionModel(config), (jnp.zeros((1, f, f, config.in_channels)), jnp.zeros((1,)),
                                          jnp.zeros((1, 1, config.cross_attention_dims[0])))
  if name == "text_encoder":
    return CLIPTextModel(config), (jnp.zeros((1, 1), jnp.int32),)
  if name == "vae":
    f = config.downsample_factor
    return AutoencoderKL(config), (jnp.zeros((1, f, f, config.in_channels)),)
  raise KeyError(f"unknown pipeline component '{name}' (components: {', '.join(COMPONENT_NAMES)})")


def abstract_params(name: str, config) -> Any:
  """The param tree of a component as shapes only (`jax.eval_shape`: nothing is initialized)."""
  model, args = component_model(name, config)
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def init_params(name: str, config, rng) -> Any:
  """Freshly initialized params of a component (flax's initializers: for training from scratch)."""
  model, args = component_model(name, config)
  return jax.jit(model.init)(rng, *args)["params"]     # one compiled program, not op by op
