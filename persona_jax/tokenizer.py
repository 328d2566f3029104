"""CLIP tokenizer: transformers' `CLIPTokenizer` over a tokenizer folder, and the one we ship.

The shipped folder (`assets/tokenizer/`) is the real OpenAI CLIP BPE (49408 tokens) rebuilt
offline by `scripts/build_tokenizer.py`, so small models tokenize exactly as SD 1.x does.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from pathlib import Path

import numpy as np

from persona_jax.errors import ModelFileError

log = logging.getLogger(__name__)

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


def tokenizer_with_tokens(folder: Path | str | None, tokens: tuple[str, ...]):
  """A fresh tokenizer (not the shared cached one) with `tokens` added, in order, after the
  vocabulary: their ids are len(vocabulary), len(vocabulary) + 1, ..."""
  import copy
  tok = copy.deepcopy(load_tokenizer(folder))
  if tokens:
    tok.add_tokens(list(tokens))
  return tok


def tokenize(tokenizer, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
  """Token ids padded/truncated to `max_length` (default: the tokenizer's 77). -> [B, L] int32."""
  if isinstance(prompts, str):
    prompts = [prompts]
  max_length = max_length or tokenizer.model_max_length
  ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                  return_attention_mask=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)
