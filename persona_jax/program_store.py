"""Traced programs kept on disk (`jax.export`): a second process loads a jitted function's program
instead of tracing and lowering it again (a second of the embedded default's `sample` start on
CPU; more for larger networks).

`StoredProgram(jitted)` is called like `jitted`. The first call of a signature exports the
function (trace + lower, as jit does) and writes the serialized `Exported` into the user cache
folder (`cache_dir()/programs`); a later process reads it back. Either way the process then runs
`jax.jit(exported.call)`, whose executable JAX's persistent compilation cache stores and loads like
any other, so the first and every later process run the same program (the same bits).

An entry's name is a digest of everything the program is a function of: the function's qualified
name, a description of every static argument, the pytree structure and the shape, dtype, weak
type and sharding of every argument, the versions of jax, jaxlib, flax, numpy and Python, JAX's
config values (x64, matmul precision, the PRNG, ...), the backend and its devices, and the bytes of
every persona_jax source file. So nothing goes stale silently: an edit of the code, a version or a
setting reads another entry. The store is used only when every static argument is plain data
(dataclasses, NamedTuples, tuples, numbers, strings, enums, dtypes: see `describe_static`), whose
description says all of it; anything else (a function, an array, an object shown by its address)
takes the plain jitted call, as does a program that cannot be exported or serialized (e.g. it
returns an unregistered pytree type: `register_serialization`; a marker file remembers it). It is
on while JAX's persistent compilation cache is (every command turns that on) and
`PERSONA_JAX_PROGRAM_STORE` is not 0. A corrupt or unreadable entry is logged (debug) and written
anew.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np

from persona_jax.cache import cache_dir

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent

# What happened to each signature in this process: "loaded" (from the store), "stored" (exported
# and written), "plain" (not storable: the jitted function as it is). Tests read it.
counts: collections.Counter = collections.Counter()

# JAX settings that cannot change a traced program: the caches', logging's and dumps'.
_SETTINGS_IGNORED = ("jax_compilation_cache", "jax_persistent_cache", "jax_enable_compilation_cache",
                     "jax_raise_persistent_cache_errors", "jax_explain_cache_misses",
                     "jax_log_compiles", "jax_logging_level", "jax_debug_log_modules", "jax_dump_ir",
                     "jax_include_debug_info_in_dumps", "jax_pprint_use_color",
                     "jax_traceback_filtering", "jax_compiler_detailed_logging_min_ops")


def enabled() -> bool:
  """On with JAX's persistent compilation cache, unless PERSONA_JAX_PROGRAM_STORE is 0/off/false
  or JAX cannot serialize programs here (its `flatbuffers` dependency is missing)."""
  if os.environ.get("PERSONA_JAX_PROGRAM_STORE", "1").lower() in ("0", "off", "false", "no"):
    return False
  return bool(jax.config.jax_compilation_cache_dir) and _can_serialize()


@functools.lru_cache(maxsize=None)
def _can_serialize() -> bool:
  import importlib.util
  if importlib.util.find_spec("flatbuffers") is None:
    log.info("program store off: JAX serializes programs with the flatbuffers package, which is "
             "not installed (pip install flatbuffers)")
    return False
  return True


def store_dir() -> Path:
  return cache_dir() / "programs"


class NotPlain(Exception):
  """A static argument the store cannot describe completely."""


def describe_static(value) -> str:
  """A complete description of a plain static argument: its type's qualified name and, walked
  recursively, its dataclass fields / NamedTuple fields / items. Raises NotPlain for anything
  else (functions, arrays, objects whose repr shows a memory address)."""
  if " at 0x" in repr(value):
    raise NotPlain(repr(value)[:200])
  return _describe(value)


def _describe(value) -> str:
  kind = f"{type(value).__module__}.{type(value).__qualname__}"
  if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
    return f"{kind}:{value!r}"
  if isinstance(value, enum.Enum):
    return f"{kind}.{value.name}:{_describe(value.value)}"
  if isinstance(value, np.dtype):
    return f"dtype:{value.str}:{value.name}"
  if isinstance(value, type):
    try:
      dtype = np.dtype(value)
    except TypeError:
      raise NotPlain(f"type {kind}") from None
    return f"dtype-type:{value.__module__}.{value.__qualname__}:{dtype.str}"
  if dataclasses.is_dataclass(value):
    fields = (f"{f.name}={_describe(getattr(value, f.name))}" for f in dataclasses.fields(value))
    return f"{kind}({', '.join(fields)})"
  if isinstance(value, tuple) and hasattr(value, "_fields"):
    items = (f"{name}={_describe(v)}" for name, v in zip(value._fields, value))
    return f"{kind}({', '.join(items)})"
  if isinstance(value, (tuple, list, frozenset)):
    items = sorted(map(_describe, value)) if isinstance(value, frozenset) else map(_describe, value)
    return f"{kind}[{', '.join(items)}]"
  if isinstance(value, dict):
    items = sorted(f"{_describe(k)}: {_describe(v)}" for k, v in value.items())
    return f"{kind}{{{', '.join(items)}}}"
  raise NotPlain(f"{kind}: {repr(value)[:200]}")


@functools.lru_cache(maxsize=None)
def environment() -> str:
  """Versions, JAX's settings, the backend and the digest of the package's sources (once per
  process: a source edited while the process runs is not seen, as Python does not see it)."""
  import flax
  import jaxlib
  sources = hashlib.sha256()
  for path in sorted(PACKAGE.rglob("*.py")):
    sources.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
  settings = sorted((name, repr(value)) for name, value in jax.config.values.items()
                    if not name.startswith(_SETTINGS_IGNORED))
  devices = jax.devices()
  return "\n".join((
      f"python {sys.version}", f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}",
      f"flax {flax.__version__}", f"numpy {np.__version__}", f"settings {settings}",
      f"backend {jax.default_backend()} {devices[0].platform} {devices[0].device_kind} "
      f"{len(devices)} devices, {jax.process_count()} processes",
      f"sources {sources.hexdigest()}"))


def _signature(args) -> tuple:
  """(treedef, ((shape, dtype, weak_type, sharding), ...)) of the call's arguments."""
  leaves, treedef = jax.tree.flatten(args)
  avals = []
  for leaf in leaves:
    aval = jax.typeof(leaf)
    avals.append((aval.shape, str(aval.dtype), aval.weak_type,
                  leaf.sharding if isinstance(leaf, jax.Array) else None))
  return treedef, tuple(avals)


def program_key(name: str, static: dict, args) -> str:
  """The store's entry name for `name` called with these static and traced arguments; raises
  NotPlain when a static argument is not plain data."""
  statics = [f"{k}={describe_static(v)}" for k, v in sorted(static.items())]
  treedef, avals = _signature(args)
  text = "\n".join((name, *statics, str(treedef), repr(avals), environment()))
  return hashlib.sha256(text.encode()).hexdigest()[:40]


class StoredProgram:
  """`jitted` (a `jax.jit` function) called with its static arguments as keywords, its programs
  kept in the store (module docstring). `_cache_size()`: the programs this process has built or
  loaded (tests: nothing recompiles)."""

  def __init__(self, jitted, name: str):
    self.jitted = jitted
    self.name = name
    self._calls: dict = {}          # (static, signature) -> the jitted exported call, or None

  def __call__(self, *args, **static):
    if not enabled():
      return self.jitted(*args, **static)
    memo = (tuple(sorted(static.items())), _signature(args))
    if memo not in self._calls:
      self._calls[memo] = self._load_or_export(args, static)
    call = self._calls[memo]
    return self.jitted(*args, **static) if call is None else call(*args)

  def _cache_size(self) -> int:
    return self.jitted._cache_size() + sum(c is not None for c in self._calls.values())

  def _load_or_export(self, args, static):
    try:
      key = program_key(self.name, static, args)
    except NotPlain as e:
      log.debug("program store: %s takes the plain jitted call (static argument not plain: %s)",
                self.name, e)
      counts["plain"] += 1
      return None
    file = store_dir() / f"{self.name.rsplit('.', 1)[-1]}-{key}.jaxexport"
    not_exportable = file.with_suffix(".not-exportable")
    if not_exportable.exists():                  # an earlier process tried: do not trace twice
      counts["plain"] += 1
      return None
    exported = _read(file)
    if exported is not None:
      log.debug("program store: %s loaded from %s", self.name, file)
      counts["loaded"] += 1
      return jax.jit(exported.call)
    try:
      exported = jax.export.export(self.jitted)(*args, **static)
      data = exported.serialize()
    except (ValueError, TypeError, NotImplementedError) as e:   # e.g. an unregistered pytree
      log.debug("program store: %s cannot be exported (%s): the plain jitted call", self.name, e)
      _write(not_exportable, str(e).encode())
      counts["plain"] += 1
      return None
    _write(file, data)
    log.debug("program store: %s stored in %s", self.name, file)
    counts["stored"] += 1
    return jax.jit(exported.call)


def _read(file: Path):
  """The Exported in `file`, or None (absent, unreadable or corrupt: logged, then rewritten)."""
  try:
    data = file.read_bytes()
  except FileNotFoundError:
    return None
  except OSError as e:
    log.debug("program store: cannot read %s (%s)", file, e)
    return None
  try:
    return jax.export.deserialize(bytearray(data))
  except Exception as e:                 # flatbuffers/MLIR errors of a damaged file: any type
    log.debug("program store: %s is corrupt (%s: %s); exporting it again", file,
              type(e).__name__, e)
    return None


def _write(file: Path, data) -> None:
  """Writes `data` to `file` atomically (a temporary name, then renamed); a read-only or full
  cache folder only loses the entry."""
  try:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, file)
  except OSError as e:
    log.debug("program store: cannot write %s (%s)", file, e)


def register_serialization(namedtuple_type) -> None:
  """Lets programs that take or return `namedtuple_type` be stored (its name in the entry)."""
  jax.export.register_namedtuple_serialization(
      namedtuple_type, serialized_name=f"{namedtuple_type.__module__}.{namedtuple_type.__qualname__}")
