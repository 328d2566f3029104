"""Textual Inversion (Gal et al. 2022): learn new token-embedding rows, nothing else.

The placeholder (and, for N vectors, `<tok>_1 ... <tok>_{N-1}`) is appended to the tokenizer
after the base vocabulary, so its ids are V .. V+N-1. The trainable leaf is only those rows,
`tokens` [N, D], initialized from a one-token initializer word; they enter the text encoder as
input embeddings (the base table concatenated with the rows, then indexed), so every existing
row and every other parameter stays bit-identical and the optimizer holds state for N rows only.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.methods.base import Method
from persona_jax.tokenizer import load_tokenizer

TOKENS = "tokens"


@dataclasses.dataclass(frozen=True)
class TextualInversionConfig:
  placeholder: str = "<concept>"     # a new token; must not exist in the vocabulary
  initializer: str = "object"        # a word that is one token; its row initializes the vectors
  num_vectors: int = 1


def placeholder_tokens(config: TextualInversionConfig) -> tuple[str, ...]:
  p = config.placeholder
  return (p,) + tuple(f"{p}_{i}" for i in range(1, config.num_vectors))


def check_new_tokens(tokenizer, tokens, initializers, vocab_rows: int,
                     fields=("method.placeholder", "method.initializer")) -> list[int]:
  """Checks new token strings (absent from the vocabulary) and their initializers (one per token:
  a word that is one token, or a token id) against the tokenizer; returns the initializers' ids."""
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


def check_tokens(tokenizer, config: TextualInversionConfig, vocab_rows: int) -> int:
  """Validates placeholder and initializer against the tokenizer; returns the initializer's id."""
  if config.num_vectors < 1:
    raise ConfigError(f"method.num_vectors must be >= 1, got {config.num_vectors}")
  return check_new_tokens(tokenizer, placeholder_tokens(config), [config.initializer],
                          vocab_rows)[0]


def embed_with_new_rows(params, ids):
  """Input embeddings [B, L, D] of ids [B, L] over the base table with the trainable rows
  `params[TOKENS]` [N, D] appended (ids V .. V+N-1 are the new tokens)."""
  base_table = params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
  full = jnp.concatenate([base_table, params[TOKENS].astype(base_table.dtype)], axis=0)
  return jnp.take(full, ids, axis=0)


def save_result(run, trainable, workdir):
  """WORKDIR/learned_embeds.safetensors: {placeholder: [num_vectors, D]} (diffusers' format)."""
  from persona_jax.convert.files import write_safetensors
  path = workdir / "learned_embeds.safetensors"
  tokens = run.method.added_tokens
  write_safetensors(path, {tokens[0]: np.asarray(trainable[TOKENS], np.float32)},
                    {"format": "pt", "tokens": json.dumps(list(tokens)),
                     "base_model": str(run.model_dir)})
  return [str(path)]


def make(config: TextualInversionConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """The Textual Inversion method for a base model (its params give the initializer's row)."""
  table = base_params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]   # [V, D]
  init_id = check_tokens(load_tokenizer(tokenizer_dir), config, table.shape[0])
  tokens = placeholder_tokens(config)
  n = len(tokens)

  def init_trainable(rng, base):
    row = base["text_encoder"]["embeddings"]["token_embedding"]["embedding"][init_id]
    return {TOKENS: jnp.tile(row[None].astype(jnp.float32), (n, 1))}             # [N, D]

  def expand_prompt(prompt: str) -> str:
    return prompt.replace(config.placeholder, " ".join(tokens)) if n > 1 else prompt

  return Method(name="textual_inversion", init_trainable=init_trainable,
                input_embeddings=embed_with_new_rows, added_tokens=tokens,
                expand_prompt=expand_prompt, save_result=save_result)
