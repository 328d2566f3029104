"""The user cache folder: embedded default models, JAX's persistent compilation cache and the
networks' parameter shapes.

`$XDG_CACHE_HOME/persona_jax` (default `~/.cache/persona_jax`); `PERSONA_JAX_CACHE` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
  if os.environ.get("PERSONA_JAX_CACHE"):
    return Path(os.environ["PERSONA_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "persona_jax"


def enable_compilation_cache(folder: Path | None = None, min_compile_secs: float = 0.0) -> Path:
  """Turns on JAX's persistent compilation cache, so a second run skips XLA compilation. A cache
  folder already configured (JAX_COMPILATION_CACHE_DIR, or by the embedding program) is kept, with
  its settings.

  Every program is stored, however fast it compiled (`min_compile_secs` 0): a command compiles a
  handful of small programs too (eager ops, the random key), 10-50 ms each, which load faster than
  they compile. The folder is the same for every run of a user (`cache_dir()`), and no size
  threshold applies (-1 also stops JAX from choosing one for the file system).
  """
  import jax
  if folder is None and jax.config.jax_compilation_cache_dir:
    return Path(jax.config.jax_compilation_cache_dir)
  folder = Path(folder) if folder is not None else cache_dir() / "jax_compilation_cache"
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return folder


def remembered_shapes(kind: str, key: str, sources, compute):
  """The tree of `jax.ShapeDtypeStruct` that `compute()` returns (nested dicts of arrays' shapes,
  e.g. a network's abstract params), remembered in the user cache folder: the next process reads
  it instead of tracing the network again (a second or more of a command's start).

  The entry is named by a digest of `kind`, `key` (what the tree is a function of, e.g. the
  network's config), the versions of jax and flax and the contents of `sources` (the files of
  the code that builds the tree), so an edit of any of them computes it anew. Without a writable
  cache folder it is computed every time.
  """
  import hashlib
  import json

  import flax
  import jax
  digest = hashlib.sha256("\n".join((kind, key, jax.__version__, flax.__version__)).encode())
  for path in sources:
    digest.update(Path(path).read_bytes())
  file = cache_dir() / "shapes" / f"{kind}-{digest.hexdigest()[:32]}.json"
  try:
    return _shapes_from_json(json.loads(file.read_text()))
  except (OSError, ValueError, TypeError, KeyError):
    pass
  tree = compute()
  try:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_shapes_to_json(tree)))
    os.replace(tmp, file)
  except OSError:
    pass
  return tree


def _shapes_to_json(tree):
  """Nested dicts stay dicts; a leaf becomes [shape, dtype name]."""
  if isinstance(tree, dict):
    return {k: _shapes_to_json(v) for k, v in tree.items()}
  return [list(tree.shape), str(tree.dtype)]


def _shapes_from_json(tree):
  import jax
  import jax.numpy as jnp
  if isinstance(tree, list):
    shape, dtype = tree
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  return {k: _shapes_from_json(v) for k, v in tree.items()}
