"""Process-level settings of a persona_jax program: the allocator tunable the console script
re-executes itself with, logging, and JAX's persistent compilation cache (cache.py)."""

from __future__ import annotations

import logging
import os
import platform
import sys

# glibc >= 2.35 can back large allocations with transparent huge pages. XLA allocates and frees
# its temporary buffers on every call; with 4 KB pages the page faults alone cost as much as the
# computation on CPU (BENCHMARKS.md), so the console script re-executes itself once with it set.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
QUIET_LOGGERS = ("jax", "absl", "orbax", "httpx", "urllib3", "grain")


def reexec_with_malloc_tunable() -> None:
  """Re-executes the running console script with GLIBC_TUNABLES=MALLOC_TUNABLE (once; only on
  glibc >= 2.35, and not when PERSONA_JAX_NO_REEXEC is set)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (sys.platform != "linux" or "glibc.malloc.hugetlb" in tunables
      or os.environ.get("PERSONA_JAX_NO_REEXEC")):
    return
  lib, version = platform.libc_ver()
  try:
    if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return
  except ValueError:
    return
  env = dict(os.environ, PERSONA_JAX_NO_REEXEC="1",
             GLIBC_TUNABLES=":".join(t for t in (tunables, MALLOC_TUNABLE) if t))
  # Re-run the console script itself (its folder, not the working directory, is on sys.path: from
  # a source checkout's root `-m` would import the uninstalled tree, which lacks
  # persona_jax.configs); `python -m persona_jax` re-runs as it was started.
  script = sys.argv[0]
  if os.path.basename(script) != "__main__.py" and os.path.isfile(script):
    command = [sys.executable, script]
  else:
    command = [sys.executable, "-m", "persona_jax"]
  os.execve(sys.executable, [*command, *sys.argv[1:]], env)


def setup_logging(verbose: bool = False) -> None:
  """INFO (DEBUG with `verbose`) lines `L name: message`, third-party loggers at WARNING, and
  the persistent compilation cache on."""
  from persona_jax.cache import enable_compilation_cache
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                      format="%(levelname).1s %(name)s: %(message)s")
  for noisy in QUIET_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.WARNING)
  enable_compilation_cache()


def release_freed_memory() -> None:
  """Hands the heap's free pages back to the system (glibc's `malloc_trim`; elsewhere a no-op).

  XLA compiles in this process, and glibc keeps the compiler's freed memory mapped: after the
  first train step of the reduced SD 1.5 UNet the process holds about 1.3 GB more than before
  it, of which `malloc_trim` returns about 0.8 GB, and the steps' peak RSS falls by as much
  (BENCHMARKS.md, the RSS breakdown). Call it after a program compiles; it takes milliseconds.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  import ctypes
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
