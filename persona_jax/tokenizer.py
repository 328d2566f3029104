"""CLIP tokenizer: transformers' `CLIPTokenizer` over a tokenizer folder, the one we ship, and
the new tokens methods add.

The shipped folder (`assets/tokenizer/`) is the real OpenAI CLIP BPE (49408 tokens) rebuilt
offline by `scripts/build_tokenizer.py`, so small models tokenize exactly as SD 1.x does.
New tokens (Textual Inversion's placeholders, Custom Diffusion's modifiers, embeddings read from
files) are appended after the vocabulary: ids V, V+1, ...; a token of N vectors is N tokens
`<tok> <tok>_1 ... <tok>_{N-1}` (`vector_tokens`), as diffusers names them.
Sampling tokenizes prompts with `load_prompt_tokenizer` (`PromptTokenizer`: the same ids from the
`tokenizers` package alone, so `sample` does not import transformers).
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from pathlib import Path

import numpy as np

from persona_jax.data.batch import IDS, IDS_2
from persona_jax.errors import ConfigError, ModelFileError

log = logging.getLogger(__name__)

ID_KEYS = (IDS, IDS_2)         # the batch key of each tokenizer's ids (SD: the first only)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                   "tokenizer.json", "added_tokens.json")


def shipped_tokenizer_dir() -> Path:
  """The folder of the tokenizer files shipped with the package."""
  return Path(str(importlib.resources.files("persona_jax") / "assets" / "tokenizer"))


@functools.lru_cache(maxsize=8)
def _load(folder: str):
  # transformers prints advisories (e.g. "PyTorch was not found") that mean nothing here.
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  from transformers import CLIPTokenizer
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(folder: Path | str | None = None):
  """Loads a CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json); None = shipped."""
  folder = Path(folder) if folder is not None else shipped_tokenizer_dir()
  has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
  if not (has_bpe or (folder / "tokenizer.json").is_file()):
    raise ModelFileError(f"{folder}: not a tokenizer folder (needs vocab.json + merges.txt, "
                         "or tokenizer.json)")
  try:
    return _load(str(folder.resolve()))
  except Exception as e:  # transformers raises several types for malformed files
    raise ModelFileError(f"{folder}: cannot load the CLIP tokenizer ({e})") from None


class PromptTokenizer:
  """Prompts -> ids as `CLIPTokenizer` gives them, with the `tokenizers` package alone (importing
  transformers is ~0.5 s of every `sample` start): the backend of transformers' CLIPTokenizerFast
  converted from the folder's slow tokenizer once (`load_prompt_tokenizer`), its truncation and
  padding set per call as CLIPTokenizerFast sets them. Called like the tokenizer by `tokenize`."""

  def __init__(self, backend, model_max_length: int):
    self.backend = backend
    self.model_max_length = model_max_length
    self._padding = dict(backend.padding)

  def __call__(self, prompts: list[str], *, padding: str, truncation: bool, max_length: int,
               return_attention_mask: bool = False) -> dict:
    if padding != "max_length" or not truncation or return_attention_mask:
      raise TypeError("PromptTokenizer pads and truncates to max_length only")
    self.backend.enable_truncation(max_length)
    self.backend.enable_padding(length=max_length, pad_id=self._padding["pad_id"],
                                pad_token=self._padding["pad_token"])
    return {"input_ids": [e.ids for e in self.backend.encode_batch(prompts)]}


def load_prompt_tokenizer(folder: Path | str | None = None):
  """The tokenizer of `folder` for prompts only: a `PromptTokenizer` read from the user cache
  folder (converted by transformers the first time, keyed by the folder's files and the
  transformers and tokenizers versions), or the transformers tokenizer (`load_tokenizer`) where
  the folder is not a plain BPE one, the conversion fails or ftfy is installed (CLIPTokenizer
  cleans text with it then). Same ids either way (tested)."""
  folder = Path(folder) if folder is not None else shipped_tokenizer_dir()
  import importlib.util
  if importlib.util.find_spec("ftfy") is not None:
    # With ftfy installed CLIPTokenizer fixes text with it, which the converted backend does not.
    return load_tokenizer(folder)
  return _load_prompt_tokenizer(str(folder.resolve()))


@functools.lru_cache(maxsize=8)
def _load_prompt_tokenizer(folder: str):
  import hashlib
  import json
  from importlib.metadata import PackageNotFoundError, version

  from persona_jax.cache import cache_dir
  folder = Path(folder)
  try:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    max_length = int(config["model_max_length"])
    digest = hashlib.sha256(f"{version('transformers')} {version('tokenizers')}".encode())
    for name in TOKENIZER_FILES:
      if name != "tokenizer.json" and (folder / name).is_file():
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    import tokenizers
  except (OSError, ValueError, KeyError, TypeError, PackageNotFoundError, ImportError):
    return load_tokenizer(folder)
  if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
    return load_tokenizer(folder)
  file = cache_dir() / "tokenizers" / f"{digest.hexdigest()[:32]}.json"
  try:
    return PromptTokenizer(tokenizers.Tokenizer.from_file(str(file)), max_length)
  except Exception:          # absent or damaged (tokenizers raises its own Exception types)
    pass
  slow = load_tokenizer(folder)
  try:
    from transformers import CLIPTokenizerFast
    fast = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True, from_slow=True)
    fast(["x"], padding="max_length", truncation=True, max_length=max_length)   # sets padding
    backend = fast.backend_tokenizer
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_text(backend.to_str())
    os.replace(tmp, file)
    return PromptTokenizer(tokenizers.Tokenizer.from_str(backend.to_str()), max_length)
  except Exception as e:     # a conversion transformers cannot do: the slow tokenizer itself
    log.debug("%s: no fast prompt tokenizer (%s); using CLIPTokenizer", folder, e)
    return slow


def tokenizer_with_tokens(folder: Path | str | None, tokens: tuple[str, ...]):
  """A fresh tokenizer (not the shared cached one) with `tokens` added, in order, after the
  vocabulary: their ids are len(vocabulary), len(vocabulary) + 1, ..."""
  import copy
  tok = copy.deepcopy(load_tokenizer(folder))
  if tokens:
    tok.add_tokens(list(tokens))
  return tok


def tokenizers_with_tokens(folders, tokens: tuple[str, ...]) -> tuple:
  """One tokenizer per text encoder (`folders`: SD's one, SDXL's two), each with `tokens` added:
  a new token has the same id in every one, or a ConfigError names the folders."""
  out = tuple(tokenizer_with_tokens(f, tokens) for f in folders)
  if len({len(t) for t in out}) > 1:
    raise ConfigError(f"{', '.join(map(str, folders))}: the tokenizers have vocabularies of "
                      f"different sizes ({', '.join(str(len(t)) for t in out)}), so a new token "
                      "would get different ids in each; use tokenizers of one vocabulary")
  return out


def tokenize_prompts(tokenizers, prompts: list[str]) -> dict[str, np.ndarray]:
  """{"ids": [B, L] (, SDXL "ids_2": [B, L] of the second tokenizer)} int32 (data/batch.py keys)."""
  return {key: tokenize(t, prompts) for key, t in zip(ID_KEYS, tokenizers)}


def tokenize(tokenizer, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
  """Token ids padded/truncated to `max_length` (default: the tokenizer's 77). -> [B, L] int32."""
  if isinstance(prompts, str):
    prompts = [prompts]
  max_length = max_length or tokenizer.model_max_length
  ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                  return_attention_mask=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def write_tokenizer(out: Path, preset: str = "sd1") -> Path:
  """Writes the shipped tokenizer as the new folder `out` (filled under a temporary name, then
  renamed into place), with SD 2.x's "!" padding for the sd2 preset. When `out` already holds a
  tokenizer (another process wrote it first), that one is kept."""
  import json
  import os
  import shutil

  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    src = shipped_tokenizer_dir()
    for f in TOKENIZER_FILES:
      if (src / f).is_file():
        (tmp / f).write_bytes((src / f).read_bytes())
    if preset == "sd2":
      for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((tmp / name).read_text())
        cfg["pad_token"] = "!"
        (tmp / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.rename(out)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not (out / "tokenizer_config.json").is_file():
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def vector_tokens(token: str, num_vectors: int) -> tuple[str, ...]:
  """The tokens of a token of `num_vectors` vectors: (token, token_1, ..., token_{N-1})."""
  return (token,) + tuple(f"{token}_{i}" for i in range(1, num_vectors))


def check_new_tokens(tokenizer, tokens, initializers, vocab_rows: int,
                     fields=("method.placeholder", "method.initializer")) -> list[int]:
  """Checks new token strings (absent from the vocabulary) and their initializers (one per token:
  a word that is one token, or a token id) against the tokenizer; returns the initializers' ids.
  `fields` name the config fields in messages."""
  vocab = tokenizer.get_vocab()
  for t in tokens:
    if t in vocab or f"{t}</w>" in vocab:
      raise ConfigError(f"{fields[0]}: '{t}' is already a token of the tokenizer; choose "
                        "a new string such as '<my-concept>'")
  init_ids = []
  for word in initializers:
    if isinstance(word, int) or str(word).isdigit():
      if not 0 <= int(word) < vocab_rows:
        raise ConfigError(f"{fields[1]}: token id {word} is outside the vocabulary (0..{vocab_rows - 1})")
      init_ids.append(int(word))
      continue
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
      pieces = tokenizer.convert_ids_to_tokens(ids)
      raise ConfigError(f"{fields[1]}: '{word}' is {len(ids)} tokens "
                        f"({' '.join(pieces)}); use a word that is a single token")
    init_ids.append(ids[0])
  if len(tokenizer) != vocab_rows:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's table "
                      f"has {vocab_rows} rows; new token ids would collide")
  return init_ids
