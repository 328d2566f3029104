"""The embedded default model: the small SD pipeline persona_jax provides when no --model is given.

It is the toy-world base (`persona-jax make-toy-model`, docs/toy_world.md), shipped as package
data (`assets/toy_base/`: float16 weights in the diffusers layout, `image_encoder/` included) and
copied on first use, with the shipped tokenizer, into the user cache (`cache.cache_dir()`) as a
complete diffusers folder named by the digest of its weights (`ship` writes it to
`VERSION_FILE`), so an old cached default never shadows a newer one. Until a base is shipped it
is a random-weight `sd1` pipeline.
"""

from __future__ import annotations

import importlib.resources
import logging
import shutil
import tempfile
from pathlib import Path

from persona_jax.cache import cache_dir

log = logging.getLogger(__name__)

TOY_BASE_PREFIX = "toy-world-base-"
VERSION_FILE = "base_version.txt"     # in the shipped folder: the digest of its weights
RANDOM_MODEL_NAME = "default-random-sd1-seed0-v1"


def shipped_base_dir() -> Path:
  """Where the package holds the toy-world base (it may be absent in a development checkout)."""
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "toy_base"))


def is_toy_base_shipped() -> bool:
  return (shipped_base_dir() / "model_index.json").is_file()


def default_model_name() -> str:
  """toy-world-base-DIGEST (the shipped base), else the random model's name."""
  if not is_toy_base_shipped():
    return RANDOM_MODEL_NAME
  return TOY_BASE_PREFIX + (shipped_base_dir() / VERSION_FILE).read_text().strip()


def default_model_dir() -> Path:
  """The embedded default's folder, written on first use."""
  name = default_model_name()
  folder = cache_dir() / "models" / name
  if (folder / "model_index.json").is_file():
    return folder
  log.info("writing the embedded default model (%s) to %s", name, folder)
  if not is_toy_base_shipped():
    from persona_jax.random_model import make_random_model
    make_random_model(folder, "sd1", seed=0, overwrite=True)
    return folder
  from persona_jax.tokenizer import shipped_tokenizer_dir
  folder.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=folder.parent) as tmp:
    staged = Path(tmp) / name
    shutil.copytree(shipped_base_dir(), staged)
    shutil.copytree(shipped_tokenizer_dir(), staged / "tokenizer")
    if folder.exists():           # a half-written copy from an interrupted first use
      shutil.rmtree(folder)
    staged.rename(folder)
  return folder


def resolve_model(model) -> Path:
  """`--model` as given, or the embedded default when it is None or 'default'."""
  if model is None or str(model) == "default":
    return default_model_dir()
  return Path(model)
