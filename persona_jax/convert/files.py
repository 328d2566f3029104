"""Finding, reading and writing the weight files of one component folder (numpy, no torch).

Looks for, in order: `{stem}[.{variant}].safetensors`, then the sharded
`{stem}.safetensors.index[.{variant}].json`. Pickle files (`.bin`, `.ckpt`, `.pt`, `.pth`) are
refused with a message saying how to opt in; with `allow_pickle=True` they are read by
`torch.load(weights_only=True)` (torch comes with the `verify` extra).

Every safetensors file persona_jax writes is byte-deterministic (tensors by name, sorted
metadata; identical runs write identical files) and records `persona_jax_digest`, a sha256 of
its tensors' names, dtypes, shapes and bytes; reading such a file checks it, so a damaged result
is refused naming the file. Files from elsewhere carry no digest and are read as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from persona_jax.errors import ModelFileError, PickleRefusedError, write_failure

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# transformers names the text encoder's files `model.*`; older folders `pytorch_model.bin`.
PICKLE_ALTERNATIVES = {"model": ("pytorch_model",)}


def add_variant(name: str, variant: str | None) -> str:
  """'model.safetensors' + 'fp16' -> 'model.fp16.safetensors' (the diffusers/transformers rule)."""
  if variant is None:
    return name
  head, ext = name.rsplit(".", 1)
  return f"{head}.{variant}.{ext}"


def find_weights(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
  """The safetensors file(s) holding a component's weights; pickle files only to refuse them."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ModelFileError(f"{folder}: component folder not found")
  single = folder / add_variant(f"{stem}.safetensors", variant)
  if single.is_file():
    return [single]
  index = folder / add_variant(f"{stem}.safetensors.index.json", variant)
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ModelFileError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    shards = [folder / s for s in sorted(set(weight_map.values()))]
    for s in shards:
      if not s.is_file():
        raise ModelFileError(f"{index}: shard {s.name} is listed but missing")
    return shards
  stems = (stem, *PICKLE_ALTERNATIVES.get(stem, ()))
  pickles = [folder / add_variant(f"{s}{suffix}", variant) for s in stems for suffix in PICKLE_SUFFIXES]
  pickles = [p for p in pickles if p.is_file()]
  if pickles:
    return pickles[:1]
  want = single.name if variant else f"{stem}.safetensors"
  hint = f" (variant '{variant}' asked for; drop --variant to use the default files)" if variant else ""
  raise ModelFileError(f"{folder}: no weights file: expected {want}{hint}")


def read_weights(folder: Path, stem: str, variant: str | None = None,
                 allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], str]:
  """Reads a component's tensors. Returns ({key: array}, a description of the source files)."""
  files = find_weights(folder, stem, variant)
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    if f.suffix in PICKLE_SUFFIXES:
      tensors.update(check_weights(_read_pickle(f, allow_pickle), f, finite=False))
    else:
      tensors.update(check_weights(read_safetensors(f), f, finite=False))
  source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{{{','.join(f.name for f in files)}}}"
  return tensors, source


DIGEST_KEY = "persona_jax_digest"
# numpy dtype name -> safetensors dtype
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                      "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
                      "bool": "BOOL"}


def _little_endian(a: np.ndarray) -> np.ndarray:
  return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


def _records(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, bytes]]:
  """(name, C-contiguous array, its bytes) of every tensor, in name order."""
  out = []
  for name in sorted(tensors):
    a = np.require(tensors[name], requirements="C")
    out.append((name, a, a.tobytes()))
  return out


def _digest(records) -> str:
  h = hashlib.sha256()
  for name, a, raw in records:
    h.update(f"{name}\0{a.dtype.name}\0{a.shape}\0".encode())
    h.update(raw)
  return h.hexdigest()[:32]


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
  """sha256 (32 hex digits) of the tensors' names, dtypes, shapes and bytes, in name order."""
  return _digest(_records(tensors))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """The file's tensors; one we wrote (it records a digest) is checked against its digest."""
  from safetensors import safe_open
  try:
    with safe_open(str(path), "np") as f:
      metadata = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for truncated/garbled files
    raise ModelFileError(f"{path}: cannot read safetensors file ({e})") from None
  recorded = metadata.get(DIGEST_KEY)
  if recorded is not None and tensor_digest(tensors) != recorded:
    raise ModelFileError(f"{path}: damaged: its tensors no longer match the digest recorded when "
                         "persona_jax wrote it; restore it from a copy, or re-create it (finish "
                         "or re-run the run that wrote it)")
  return tensors


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Integer buffers some checkpoints carry beside their weights (never read as weights).
INTEGER_BUFFERS = ("position_ids", "num_batches_tracked", "num_updates", "string_to_token")


def check_weights(tensors: Mapping[str, np.ndarray], path, *, finite: bool) -> Mapping:
  """Refuses a non-float weight (an integer buffer of INTEGER_BUFFERS aside) and, with `finite`
  (adapter and embedding files, results), a non-finite value, naming the file and the tensor."""
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    if any(part in name for part in INTEGER_BUFFERS):
      continue
    if a.dtype.name not in FLOAT_DTYPES:
      raise ModelFileError(f"{path}: tensor {name} is {a.dtype}, not floating point; weights are "
                           "float16/bfloat16/float32/float64 (a damaged or wrongly converted file)")
    if finite:
      bad = int(a.size - np.count_nonzero(np.isfinite(a)))
      if bad:
        raise ModelFileError(f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN or "
                             "inf): it was saved from a diverged run or is damaged; use another "
                             "file")
  return tensors


def read_adapter(path: Path) -> dict[str, np.ndarray]:
  """An adapter, embedding or result .safetensors: read (its digest checked), float and finite."""
  return dict(check_weights(read_safetensors(path), path, finite=True))


def load_pickle(path: Path, allow_pickle: bool):
  """What a torch pickle holds (torch's safe `weights_only` unpickler), only with the opt-in:
  without it PickleRefusedError; without torch, or a file torch refuses, one-line
  ModelFileErrors."""
  if not allow_pickle:
    raise PickleRefusedError(
        f"{path}: refusing to load a pickle file (it can run arbitrary code). Convert it to "
        "safetensors, or, if you trust it, opt in: --allow-pickle for sample, verify and "
        "import-fastcomposer; --config.method.allow_pickle=True for an ip_adapter or photomaker "
        "train run's pretrained file (train reads no other pickle); allow_pickle=True in load_pipeline; "
        "reading it needs torch (pip install 'persona-jax[verify]').")
  try:
    import torch
  except ImportError:
    raise ModelFileError(f"{path}: reading a pickle file needs torch; pip install "
                         "'persona-jax[verify]' -c constraints.txt") from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch's unpickler refusing an object, or a damaged file
    first = " ".join(str(e).split())[:200]
    raise ModelFileError(f"{path}: cannot read this pickle even with the opt-in ({type(e).__name__}: "
                         f"{first}); it holds more than tensors or is damaged: convert it to "
                         "safetensors where it was made") from None
  return state


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
  state = load_pickle(path, allow_pickle)
  import torch
  while isinstance(state, Mapping) and "state_dict" in state and len(state) <= 3:
    state = state["state_dict"]
  out = {}
  for k, v in state.items():
    if isinstance(v, torch.Tensor):
      out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _publish(tmp: str, path: Path) -> None:
  """Gives a finished temporary file normal permissions and renames it into place."""
  os.chmod(tmp, 0o666 & ~_umask())
  os.replace(tmp, path)


def safetensors_bytes(records, metadata: Mapping[str, str]) -> list:
  """The safetensors file of `_records` as a list of byte chunks: the 8-byte header size, the
  JSON header (metadata sorted, then the tensors by name; padded with spaces to 8 bytes), the
  data."""
  header = {"__metadata__": dict(sorted(metadata.items()))}
  offset = 0
  for name, a, raw in records:
    if a.dtype.name not in SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors")
    header[name] = {"dtype": SAFETENSORS_DTYPES[a.dtype.name], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return [len(text).to_bytes(8, "little"), text, *(raw for _, _, raw in records)]


@contextlib.contextmanager
def atomic_write(path, suffix: str = ".tmp"):
  """Yields a temporary file's path beside `path` to write; then fsyncs it, gives it normal
  permissions and renames it into place. On any failure the temporary is removed, and an OS
  error (a full disk, a read-only folder) becomes one WriteFailed line naming `path`."""
  path = Path(path)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    yield Path(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    _publish(tmp, path)
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise write_failure(path, e) from None
    raise


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes atomically (`atomic_write`) and deterministically, recording the tensors' digest
  (module docstring). Each tensor's bytes are made once, for the digest and the file."""
  records = _records({k: _little_endian(np.asarray(v)) for k, v in tensors.items()})
  metadata = {**dict(metadata or {"format": "pt"}), DIGEST_KEY: _digest(records)}
  with atomic_write(path) as tmp, open(tmp, "wb") as f:
    for chunk in safetensors_bytes(records, {k: str(v) for k, v in metadata.items()}):
      f.write(chunk)


def write_json(path: Path, obj) -> None:
  """Writes JSON atomically (`atomic_write`), with the indentation diffusers uses."""
  with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def copy_file(src: Path, dst: Path) -> Path:
  """Copies a file atomically (`atomic_write`)."""
  import shutil
  with atomic_write(dst) as tmp:
    shutil.copyfile(src, tmp)
  return Path(dst)
