"""The BLIP-Diffusion Q-Former's tokenizer: transformers' `BertTokenizer` (uncased WordPiece) over
a folder, and the subject category's ids as diffusers' deprecated pipeline makes them.

The shipped folder (`assets/qformer_tokenizer/`) is `bert-base-uncased`'s vocabulary (30522
tokens) rebuilt offline by `scripts/build_qformer_tokenizer.py`; a `qformer_tokenizer/` folder in
the model folder takes precedence. As LAVIS and diffusers do, the loader adds `[DEC]` as the BOS
token (id 30522), so the tokenizer has 30523 tokens: the rows of the released Q-Former's word
embeddings. `[DEC]` is never among the category's ids.

A subject category of several words ("teddy bear") is one text, as in the pipeline: `[CLS] teddy
bear [SEP]`, every word a token (or several WordPiece pieces) the Q-Former attends to.
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

FOLDER = "qformer_tokenizer"   # its name in a model folder and in the package's assets
BOS_TOKEN = "[DEC]"            # LAVIS's decoder BOS, added after the vocabulary


def shipped_qformer_tokenizer_dir() -> Path:
  """The folder of the Q-Former tokenizer files shipped with the package."""
  return Path(str(importlib.resources.files("persona_jax") / "assets" / FOLDER))


def qformer_tokenizer_dir(model_dir: Path | str | None = None) -> Path:
  """MODEL_DIR/qformer_tokenizer/ when it exists, else the shipped folder."""
  if model_dir is not None and (Path(model_dir) / FOLDER).is_dir():
    return Path(model_dir) / FOLDER
  return shipped_qformer_tokenizer_dir()


@functools.lru_cache(maxsize=4)
def _load(folder: str):
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  from transformers import BertTokenizer
  tok = BertTokenizer.from_pretrained(folder, truncation_side="right", local_files_only=True)
  tok.add_special_tokens({"bos_token": BOS_TOKEN})
  return tok


def load_qformer_tokenizer(model_dir: Path | str | None = None):
  """The Q-Former's BertTokenizer (with `[DEC]` added, as the pipeline does) from
  MODEL_DIR/qformer_tokenizer/ when that folder exists, else the shipped one. Shared and cached:
  do not add tokens to it."""
  folder = qformer_tokenizer_dir(model_dir)
  if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
    raise ModelFileError(f"{folder}: not a BERT tokenizer folder (needs vocab.txt or "
                         "tokenizer.json); remove it to use the shipped bert-base-uncased one")
  try:
    return _load(str(folder.resolve()))
  except Exception as e:  # transformers raises several types for malformed files
    raise ModelFileError(f"{folder}: cannot load the Q-Former's BERT tokenizer ({e})") from None


def tokenize_category(tokenizer, texts: str | list[str], max_length: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Subject categories -> (input_ids [B, L] int32, attention_mask [B, L] int32).

  `[CLS] words [SEP]`, padded with `[PAD]` (mask 0). max_length None: padded to the longest, the
  pipeline's own call. max_length L: padded to L (a fixed shape for jit; the pads are masked, so
  the Q-Former's outputs do not change) and a longer text cut to L, keeping `[SEP]` last, which
  the pipeline never does (it would fail past the Q-Former's 512 positions)."""
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if max_length is None:
    enc = tokenizer(texts, padding=True)
  else:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    full = tokenizer(texts)["input_ids"]
    for text, ids in zip(texts, full):
      if len(ids) > max_length:
        log.warning("subject category %r is %d tokens; cut to %d", text, len(ids), max_length)
  return (np.asarray(enc["input_ids"], dtype=np.int32),
          np.asarray(enc["attention_mask"], dtype=np.int32))


def check_vocab_size(tokenizer, rows: int, source) -> None:
  """A one-line ModelFileError when the tokenizer's size (with `[DEC]`) is not the Q-Former's
  word-embedding rows; `source` names the Q-Former's weights in the message."""
  if len(tokenizer) != rows:
    raise ModelFileError(
        f"{source}: the Q-Former's word embeddings have {rows} rows but its tokenizer "
        f"({tokenizer.name_or_path}) has {len(tokenizer)} tokens with {BOS_TOKEN}; put the "
        f"Q-Former's own BERT vocabulary in the model folder's {FOLDER}/")
