"""The networks of a Stable Diffusion pipeline as one bundle, and their parameter trees.

`SDModels` is the static half (module objects, hashable: a static argument of every jitted
function); params always travel separately, as `{"unet": ..., "text_encoder": ..., "vae": ...}`
(plus whatever side networks a method brings, e.g. `image_encoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from persona_jax.cache import remembered_shapes
from persona_jax.models.text_encoder import CLIPTextModel
from persona_jax.models.unet import UNet2DConditionModel, example_inputs
from persona_jax.models.vae import AutoencoderKL

COMPONENT_NAMES = ("unet", "text_encoder", "vae", "text_encoder_2")
MODELS = Path(__file__).parent             # the networks' code: what their param trees depend on


class SDModels(NamedTuple):
  """The networks of a pipeline (static module objects; params come separately); SDXL's second
  text encoder (CLIPTextModelWithProjection) in `text_encoder_2`, None for SD 1.x/2.x."""
  unet: UNet2DConditionModel
  text_encoder: CLIPTextModel
  vae: AutoencoderKL
  text_encoder_2: CLIPTextModel | None = None


def component_model(name: str, config):
  """(module, example inputs) of a pipeline component, for creating its params."""
  if name == "unet":
    *args, added_cond = example_inputs(config)
    return UNet2DConditionModel(config), (*args, None, added_cond)
  if name in ("text_encoder", "text_encoder_2"):
    return CLIPTextModel(config), (jnp.zeros((1, 1), jnp.int32),)
  if name == "vae":
    f = config.downsample_factor
    return AutoencoderKL(config), (jnp.zeros((1, f, f, config.in_channels)),)
  raise KeyError(f"unknown pipeline component '{name}' (components: {', '.join(COMPONENT_NAMES)})")


def abstract_params(name: str, config) -> Any:
  """The param tree of a component as shapes only (`jax.eval_shape`: nothing is initialized),
  remembered in the user cache folder per config and version of this package's networks (tracing
  the UNet's and VAE's init costs more than a second at every start)."""
  def trace():
    model, args = component_model(name, config)
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  return remembered_shapes(f"{name}-params", repr(config), sorted(MODELS.glob("*.py")), trace)


def init_params(name: str, config, rng) -> Any:
  """Freshly initialized params of a component (flax's initializers: for training from scratch)."""
  model, args = component_model(name, config)
  return jax.jit(model.init)(rng, *args)["params"]     # one compiled program, not op by op
