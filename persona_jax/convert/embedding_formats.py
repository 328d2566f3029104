"""Textual Inversion embedding files: writing them for other tools, reading theirs back.

An embedding is N token-embedding rows [N, D] (D = 768 for SD 1.x, 1024 for SD 2.x) with a
trigger token. The layouts (all safetensors; pickles are never read):

  diffusers      `learned_embeds.safetensors` = {token: [N, D]} (or [D]), metadata
                 {"format": "pt"}. Read by diffusers' `load_textual_inversion` (one key only: it
                 refuses files with several), A1111 and ComfyUI (they take the first tensor).
  A1111          `{trigger}.safetensors` = {"emb_params": [N, D]}: A1111, ComfyUI and OneTrainer
                 take the trigger word from the file name. diffusers reads it with `token=`.
  A1111 (.pt)    {"string_to_param": {"*": [N, D]}, "name": ...}, a torch pickle; its tensor
                 stored as safetensors has the key `string_to_param.*`.
  Custom Diff.   `<new1>.safetensors` = {"<new1>": [D]}, one file per modifier token.

A token with N > 1 vectors becomes the tokens `tok, tok_1, ..., tok_{N-1}` (diffusers' rule) and
`tok` in a prompt expands to all of them. For sampling, `with_embeddings` appends the rows to the
text encoder's table, as diffusers' `resize_token_embeddings` does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from persona_jax.convert.files import PICKLE_SUFFIXES, read_adapter, write_safetensors
from persona_jax.errors import ConfigError, ModelFileError, PickleRefusedError
from persona_jax.tokenizer import check_new_tokens, load_tokenizer, tokenizer_with_tokens, vector_tokens

DIFFUSERS_FILE = "learned_embeds.safetensors"
A1111_KEY = "emb_params"
STRING_TO_PARAM = "string_to_param."          # A1111's nested dict, flattened by safetensors
STRING_TO_TOKEN = "string_to_token."
GENERIC_KEYS = (A1111_KEY, "*")               # keys that are not a token: the file stem is
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Characters Windows or POSIX refuse in file names, plus whitespace (A1111 trigger words are one
# word); they are dropped from the A1111 file name.
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\s]+')


def _as_rows(value, where: str) -> np.ndarray:
  """[D] or [N, D] floating array -> float32 [N, D]; anything else is a ModelFileError."""
  value = np.asarray(value)
  if value.dtype.name not in FLOAT_DTYPES or value.ndim not in (1, 2) or 0 in value.shape:
    raise ModelFileError(f"{where}: expected a float [D] or [N, D] tensor, got "
                         f"{value.dtype.name} {tuple(value.shape)}")
  return np.ascontiguousarray(value.astype(np.float32).reshape(-1, value.shape[-1]))


def write_diffusers_embedding(embeddings: Mapping[str, np.ndarray], out_dir,
                              metadata: Mapping[str, Any] | None = None) -> Path:
  """Writes OUT_DIR/learned_embeds.safetensors = {token: float32 [N, D]}, metadata
  {"format": "pt", "tokens": [tok, tok_1, ...], **metadata} (values as strings).

  One token per file: diffusers' `load_textual_inversion` refuses a file with several keys.
  Load it with `pipe.load_textual_inversion(OUT_DIR)`. Use a lowercase token when N > 1:
  diffusers' prompt expansion misses mixed-case tokens (CLIP lowercases the prompt first).
  """
  if len(embeddings) != 1:
    raise ConfigError(f"a diffusers embedding file holds exactly one token, got {len(embeddings)} "
                      f"({', '.join(embeddings)}); write one folder per token")
  (token, vectors), = embeddings.items()
  rows = _as_rows(vectors, f"embedding '{token}'")
  meta = {"tokens": json.dumps(list(vector_tokens(token, len(rows))))}
  meta.update({k: str(v) for k, v in (metadata or {}).items()})
  meta["format"] = "pt"
  path = Path(out_dir) / DIFFUSERS_FILE
  write_safetensors(path, {token: rows}, meta)
  return path


def a1111_file_name(token: str) -> str:
  """The A1111 file name for a token: characters bad in file names (<>:"/\\|?* and whitespace)
  dropped, e.g. '<cat-toy>' -> 'cat-toy.safetensors' (the A1111 trigger word is then 'cat-toy')."""
  name = _BAD_NAME_CHARS.sub("", token).strip(".")
  if not name:
    raise ConfigError(f"embedding token '{token}' has no characters usable in a file name")
  return f"{name}.safetensors"


def write_a1111_embedding(token: str, vectors: np.ndarray, out_dir) -> Path:
  """Writes OUT_DIR/{trigger}.safetensors = {"emb_params": float32 [N, D]} (A1111, ComfyUI).

  The trigger word is the file name: `a1111_file_name(token)`. diffusers loads it with
  `pipe.load_textual_inversion(path, token=trigger)`.
  """
  rows = _as_rows(vectors, f"embedding '{token}'")
  path = Path(out_dir) / a1111_file_name(token)
  write_safetensors(path, {A1111_KEY: rows}, {"format": "pt", "name": path.stem})
  return path


def read_embedding_spec(spec: str, width: int | None = None,
                        sdxl: bool = False) -> dict[str, np.ndarray]:
  """`--embedding FILE[:TOKEN]`: an existing path is taken whole (its name may hold `:`)."""
  file, _, token = (spec, "", "") if Path(spec).exists() else str(spec).partition(":")
  return read_embedding_file(file, token or None, width=width, sdxl=sdxl)


def read_embedding_file(path, token: str | None = None, width: int | None = None,
                        sdxl: bool = False) -> dict[str, np.ndarray]:
  """Reads a Textual Inversion embedding file -> {token: float32 [N, D]}.

  Accepts a diffusers output folder (its learned_embeds.safetensors) or a safetensors file:
  {token: [N, D] | [D]} (the key is the token), {"emb_params": ...} or {"*": ...} (the file
  stem is the token), or `string_to_param.*` (+ optional `string_to_token.*`; the stem is the
  token). `token` overrides the token in every layout; `width` checks D; `sdxl`: the model the
  embedding is for is SDXL (SD 1.x/2.x embeddings, one table, are refused for it).
  Raises:
    PickleRefusedError for .pt/.bin/.ckpt/.pth; ModelFileError naming the file and the first key
    that fits no layout, or the width found and needed.
  """
  path = Path(path)
  if path.is_dir():
    path = path / DIFFUSERS_FILE
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise PickleRefusedError(
        f"{path}: a pickle file; persona_jax does not read pickles (loading one can run code). "
        "Convert it to .safetensors (torch.load(weights_only=True), then safetensors.torch."
        "save_file) or use the .safetensors version of the embedding")
  if not path.is_file():
    raise ModelFileError(f"{path}: embedding file not found")
  tensors = read_adapter(path)
  keys = list(tensors)
  if not keys:
    raise ModelFileError(f"{path}: the file holds no tensors")
  if "clip_g" in tensors or "clip_l" in tensors:
    raise ModelFileError(f"{path}: an SDXL embedding (keys {', '.join(sorted(tensors))}); "
                         "persona_jax supports SD 1.x/2.x embeddings")
  if sdxl:
    raise ModelFileError(f"{path}: an SD 1.x/2.x embedding (one table), but the model is SDXL "
                         "(two text encoders); use an SD 1.x/2.x base model with it")
  if any(k.startswith(STRING_TO_PARAM) for k in keys):
    other = [k for k in keys if not k.startswith((STRING_TO_PARAM, STRING_TO_TOKEN))]
    params = [k for k in keys if k.startswith(STRING_TO_PARAM)]
    if other:
      raise ModelFileError(f"{path}: key '{other[0]}' does not belong to an A1111 "
                           "string_to_param embedding")
    if len(params) != 1:
      raise ModelFileError(f"{path}: {len(params)} string_to_param entries ({', '.join(params)}); "
                           "an embedding file holds one")
    key, name = params[0], path.stem
  elif len(keys) == 1:
    key = keys[0]
    name = path.stem if key in GENERIC_KEYS else key
  else:
    raise ModelFileError(
        f"{path}: not a textual-inversion embedding: key '{keys[0]}' fits no layout ({len(keys)} "
        "keys; expected a single {token: [N, D]} tensor, 'emb_params', or 'string_to_param.*')")
  rows = _as_rows(tensors[key], f"{path}: key '{key}'")
  if width is not None and rows.shape[1] != width:
    raise ModelFileError(f"{path}: embedding width {rows.shape[1]}, but this model's text encoder "
                         f"needs {width} (SD 1.x: 768, SD 2.x: 1024)")
  name = token or name
  if not name.strip():
    raise ModelFileError(f"{path}: no token name; pass one (FILE:TOKEN)")
  return {name: rows}


class WithEmbeddings(NamedTuple):
  """A pipeline that samples with added embeddings (see `with_embeddings`)."""
  pipe: Any                              # Pipeline; text encoder table [V + N, D]
  tokenizer: Any                         # the base tokenizer + the N tokens (ids V .. V+N-1)
  expand_prompt: Callable[[str], str]    # 'tok' -> 'tok tok_1 ...' for multi-vector tokens


def with_embeddings(pipe, embeddings: Mapping[str, np.ndarray], params=None) -> WithEmbeddings:
  """The pipeline with embedding rows appended to its text encoder's token table.

  Args:
    pipe: a loaded Pipeline (its vocabulary V must equal its table's rows).
    embeddings: {token: [N, D] or [D]}; tokens get ids V, V+1, ... in order.
    params: the params to start from (default `pipe.params`), e.g. with LoRAs merged.
  Returns:
    (pipe, tokenizer, expand_prompt): sample with `text_to_image(r.pipe, prompts,
    tokenizer=r.tokenizer, expand_prompt=r.expand_prompt)`. The returned pipe's config has
    vocab_size V + N and its `tokenizer` is the one returned: it is for sampling, not for
    `save_pipeline` (its tokenizer folder is the base one).
  Raises:
    ConfigError naming a token already in the vocabulary (case-insensitively: CLIP lowercases
    prompts) or an embedding whose width is not the text encoder's.
  """
  params = pipe.params if params is None else params
  te = params["text_encoder"]
  table = te["embeddings"]["token_embedding"]["embedding"]                  # [V, D]
  vocab_rows, d = table.shape
  tokens, rows = [], []
  for token, vectors in embeddings.items():
    v = _as_rows(vectors, f"embedding '{token}'")
    if v.shape[1] != d:
      raise ConfigError(f"embedding '{token}': width {v.shape[1]}, but this model's text encoder "
                        f"needs {d}")
    tokens += vector_tokens(token, len(v))
    rows.append(v)
  lowered = [t.lower() for t in tokens]
  if len(set(lowered)) != len(lowered):
    raise ConfigError(f"embedding tokens repeat (CLIP matches them case-insensitively): {tokens}")
  base = load_tokenizer(pipe.tokenizer_dir)
  for t, low in zip(tokens, lowered):
    field = "embedding token" if low == t else f"embedding token '{t}' (CLIP lowercases prompts)"
    check_new_tokens(base, [low], (), vocab_rows, fields=(field, "embedding"))
  tokenizer = tokenizer_with_tokens(pipe.tokenizer_dir, tuple(tokens))
  new_table = jnp.concatenate([table, jnp.asarray(np.concatenate(rows), table.dtype)], axis=0)
  emb = te["embeddings"]
  te = {**te, "embeddings": {**emb, "token_embedding": {**emb["token_embedding"],
                                                         "embedding": new_table}}}
  vocab = vocab_rows + len(tokens)
  raw = {**pipe.raw_configs, "text_encoder": {**pipe.raw_configs["text_encoder"], "vocab_size": vocab}}
  out = dataclasses.replace(
      pipe, params={**params, "text_encoder": te}, raw_configs=raw,
      text_encoder_config=dataclasses.replace(pipe.text_encoder_config, vocab_size=vocab))
  out.__dict__["tokenizer"] = tokenizer       # fills the cached property: pipe.tokenizer agrees
  return WithEmbeddings(out, tokenizer, _prompt_expander(
      {t: len(r) for t, r in zip(embeddings, rows) if len(r) > 1}))


def _prompt_expander(counts: Mapping[str, int]) -> Callable[[str], str]:
  """prompt -> prompt with each multi-vector token (in any case, as CLIP matches it; not when
  already followed by `_K`) replaced by its N tokens, in one pass, longest token first."""
  if not counts:
    return lambda prompt: prompt
  replacements = {t.lower(): " ".join(vector_tokens(t, n)) for t, n in counts.items()}
  alternatives = "|".join(re.escape(t) for t in sorted(replacements, key=len, reverse=True))
  pattern = re.compile(f"(?:{alternatives})(?!_\\d)", re.IGNORECASE)

  def expand_prompt(prompt: str) -> str:
    return pattern.sub(lambda m: replacements[m.group(0).lower()], prompt)
  return expand_prompt
