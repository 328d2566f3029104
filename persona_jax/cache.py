"""The user cache folder: embedded default models and JAX's persistent compilation cache.

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
