"""The embedded models: the small pipelines persona_jax ships, accepted wherever a model path is.

`default` (or no --model) is the SD 1.x toy-world base; `toy-xl` is the toy SDXL base
(`persona-jax make-toy-model --xl`, world/toy_xl.py), shipped the same way in `assets/toy_xl/`
and copied with both tokenizers (the second with SDXL's "!" padding) into
`toy-xl-base-DIGEST-FILES`.

It is the toy-world base (`persona-jax make-toy-model`, docs/toy_world.md), shipped as package
data (`assets/toy_base/`: float16 weights in the diffusers layout, `image_encoder/` included) and
copied on first use, with the shipped tokenizer, into the user cache (`cache.cache_dir()`) as a
complete diffusers folder named by the digest of its weights (`ship` writes it to
`VERSION_FILE`) and a digest of every shipped file (configs too), so an old cached default never
shadows a newer one, even one whose weights are unchanged. Until a base is shipped it is a
random-weight `sd1` pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import logging
import shutil
import tempfile
from pathlib import Path

from persona_jax.cache import cache_dir

log = logging.getLogger(__name__)

TOY_BASE_PREFIX = "toy-world-base-"
TOY_XL = "toy-xl"
TOY_XL_PREFIX = "toy-xl-base-"
VERSION_FILE = "base_version.txt"     # in the shipped folder: the digest of its weights
RANDOM_MODEL_NAME = "default-random-sd1-seed0-v1"


def shipped_base_dir() -> Path:
  """Where the package holds the toy-world base (it may be absent in a development checkout)."""
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "toy_base"))


def is_toy_base_shipped() -> bool:
  return (shipped_base_dir() / "model_index.json").is_file()


def default_model_name() -> str:
  """toy-world-base-DIGEST-FILES (the shipped base: `cache_name`), else the random model's name."""
  if not is_toy_base_shipped():
    return RANDOM_MODEL_NAME
  return cache_name(TOY_BASE_PREFIX, shipped_base_dir())


def cache_name(prefix: str, shipped: Path) -> str:
  """PREFIX + the weights' digest (VERSION_FILE) + "-" + 8 hex digits of every shipped file."""
  version = (shipped / VERSION_FILE).read_text().strip()
  files = sorted(f for f in shipped.rglob("*") if f.is_file() and not f.name.startswith("."))
  stamps = tuple((f.relative_to(shipped).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                 for f in files)
  return f"{prefix}{version}-{_files_digest(shipped, stamps)}"


@functools.lru_cache(maxsize=16)
def _files_digest(shipped: Path, stamps: tuple) -> str:
  """sha256 over the files' paths and bytes (once per process while their sizes and times hold)."""
  h = hashlib.sha256()
  for rel, _, _ in stamps:
    h.update(rel.encode() + b"\0")
    h.update((shipped / rel).read_bytes())
  return h.hexdigest()[:8]


def default_model_dir() -> Path:
  """The embedded default's folder, written on first use."""
  name = default_model_name()
  if not is_toy_base_shipped():
    folder = cache_dir() / "models" / name
    if not (folder / "model_index.json").is_file():
      from persona_jax.random_model import make_random_model
      make_random_model(folder, "sd1", seed=0, overwrite=True)
    return folder
  return _cached_copy(shipped_base_dir(), name, {"tokenizer": "sd1"})


def shipped_xl_dir() -> Path:
  """Where the package holds the toy SDXL base."""
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "toy_xl"))


def toy_xl_dir() -> Path:
  """The toy SDXL base's folder in the cache, written on first use."""
  shipped = shipped_xl_dir()
  if not (shipped / "model_index.json").is_file():
    from persona_jax.errors import ConfigError
    raise ConfigError(f"--model {TOY_XL}: this installation has no toy SDXL base ({shipped} is "
                      "missing); reinstall persona_jax or make one with `persona-jax "
                      "make-toy-model --xl`")
  name = cache_name(TOY_XL_PREFIX, shipped)
  return _cached_copy(shipped, name, {"tokenizer": "sd1", "tokenizer_2": "sd2"})


def _cached_copy(shipped: Path, name: str, tokenizers: dict[str, str]) -> Path:
  """cache/models/NAME: the shipped folder with tokenizer folders added (written once, staged
  under a temporary name and renamed into place)."""
  from persona_jax.tokenizer import write_tokenizer
  folder = cache_dir() / "models" / name
  if (folder / "model_index.json").is_file():
    return folder
  log.info("writing the embedded model %s to %s", name, folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=folder.parent) as tmp:
    staged = Path(tmp) / name
    shutil.copytree(shipped, staged)
    for sub, preset in tokenizers.items():
      write_tokenizer(staged / sub, preset)
    if folder.exists():           # a half-written copy from an interrupted first use
      shutil.rmtree(folder)
    staged.rename(folder)
  return folder


def resolve_model(model) -> Path:
  """`--model` as given: None or 'default' is the embedded SD 1.x base, 'toy-xl' the toy SDXL
  base (a folder of that name in the working directory wins)."""
  if model is None or str(model) == "default":
    return default_model_dir()
  if str(model) == TOY_XL and not Path(model).exists():
    return toy_xl_dir()
  return Path(model)
