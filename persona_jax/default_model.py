"""The embedded default model: the small SD pipeline persona_jax provides when no --model is given.

It is written on first use into the user cache (`cache.cache_dir()`), in a folder named by its
version, so an old cached default never shadows a newer one. Until the toy-world base model lands
it is a random-weight `sd1` pipeline: samples show the pipeline working, not a learned subject.
"""

from __future__ import annotations

import logging
from pathlib import Path

from persona_jax.cache import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default-random-sd1-seed0-v1"


def default_model_dir() -> Path:
  """The embedded default's folder, written on first use."""
  folder = cache_dir() / "models" / DEFAULT_MODEL_NAME
  if not (folder / "model_index.json").is_file():
    from persona_jax.random_model import make_random_model
    log.info("writing the embedded default model (%s) to %s", DEFAULT_MODEL_NAME, folder)
    make_random_model(folder, "sd1", seed=0, overwrite=True)
  return folder


def resolve_model(model) -> Path:
  """`--model` as given, or the embedded default when it is None or 'default'."""
  if model is None or str(model) == "default":
    return default_model_dir()
  return Path(model)
