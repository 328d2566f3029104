"""Method names -> (typed config class, factory). Adding a method: one module and one entry."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from persona_jax.errors import ConfigError
from persona_jax.methods import custom_diffusion, dreambooth, e4t, ip_adapter, lora, textual_inversion
from persona_jax.methods import instantbooth
from persona_jax.methods import fastcomposer

METHODS = {
    "custom_diffusion": (custom_diffusion.CustomDiffusionConfig, custom_diffusion.make),
    "dreambooth": (dreambooth.DreamBoothConfig, dreambooth.make),
    "e4t": (e4t.E4TConfig, e4t.make),
    "ip_adapter": (ip_adapter.IPAdapterConfig, ip_adapter.make),
    "fastcomposer": (fastcomposer.FastComposerConfig, fastcomposer.make),
    "instantbooth": (instantbooth.InstantBoothConfig, instantbooth.make),
    "lora": (lora.LoRAConfig, lora.make),
    "textual_inversion": (textual_inversion.TextualInversionConfig, textual_inversion.make),
}


def method_config(name: str, values: Mapping):
  """The typed config of method `name` from the `method` section of a run config."""
  if name not in METHODS:
    raise ConfigError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
  cls = METHODS[name][0]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"method.{unknown[0]}: not an option of {name} "
                      f"(options: {', '.join(sorted(fields))})")
  return cls(**values)


def make_method(name: str, values: Mapping, base_params, tokenizer_dir=None, unet_config=None):
  """Builds the Method from its name, its config values and the base model."""
  return METHODS[name][1](method_config(name, values), base_params, tokenizer_dir, unet_config)
