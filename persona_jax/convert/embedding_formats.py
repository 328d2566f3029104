"""Textual Inversion embedding files: writing them for other tools, reading theirs back.

An embedding is N token-embedding rows [N, D] (D = 768 for SD 1.x, 1024 for SD 2.x) with a
trigger token; on SDXL it is N rows for each text encoder, {"clip_l": [N, D1], "clip_g": [N, D2]}
(768 and 1280). The layouts (all safetensors; pickles are never read):

  diffusers      `learned_embeds.safetensors` = {token: [N, D]} (or [D]), metadata
                 {"format": "pt"}. Read by diffusers' `load_textual_inversion` (one key only: it
                 refuses files with several), A1111 and ComfyUI (they take the first tensor).
  A1111          `{trigger}.safetensors` = {"emb_params": [N, D]}: A1111, ComfyUI and OneTrainer
                 take the trigger word from the file name. diffusers reads it with `token=`.
  A1111 (.pt)    {"string_to_param": {"*": [N, D]}, "name": ...}, a torch pickle; its tensor
                 stored as safetensors has the key `string_to_param.*`.
  Custom Diff.   `<new1>.safetensors` = {"<new1>": [D]}, one file per modifier token.
  SDXL           {"clip_l": [N, 768], "clip_g": [N, 1280]}: text_encoder's and text_encoder_2's
                 rows (A1111, ComfyUI, OneTrainer; diffusers' train_dreambooth_lora_sdxl_advanced.py
                 `save_embeddings`). The trigger word is the file name (ours also record it in the
                 metadata `tokens`). diffusers loads it per encoder:
                 `pipe.load_textual_inversion(sd["clip_l"], token=T, text_encoder=pipe.text_encoder,
                 tokenizer=pipe.tokenizer)`, the same with clip_g, text_encoder_2, tokenizer_2.

A token with N > 1 vectors becomes the tokens `tok, tok_1, ..., tok_{N-1}` (diffusers' rule) and
`tok` in a prompt expands to all of them. For sampling, `with_embeddings` appends the rows to each
text encoder's table, as diffusers' `resize_token_embeddings` does.

In memory an embedding's rows are `[N, D]` (SD 1.x/2.x) or, SDXL, the dict {"clip_l", "clip_g"}
(the file's own keys); `encoder_rows` maps either onto a model's text encoders.
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
from persona_jax.diffusion.conditioning import TOKEN_ROWS, text_encoders, token_table
from persona_jax.errors import ConfigError, ModelFileError, PickleRefusedError
from persona_jax.tokenizer import (check_new_tokens, load_tokenizer, tokenizers_with_tokens,
                                   vector_tokens)

DIFFUSERS_FILE = "learned_embeds.safetensors"
A1111_KEY = "emb_params"
STRING_TO_PARAM = "string_to_param."          # A1111's nested dict, flattened by safetensors
STRING_TO_TOKEN = "string_to_token."
GENERIC_KEYS = (A1111_KEY, "*")               # keys that are not a token: the file stem is
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}   # encoder -> its SDXL file key
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


def write_diffusers_embedding(embeddings: Mapping[str, Any], out_dir,
                              metadata: Mapping[str, Any] | None = None) -> Path:
  """Writes OUT_DIR/learned_embeds.safetensors = {token: float32 [N, D]}, metadata
  {"format": "pt", "tokens": [tok, tok_1, ...], **metadata} (values as strings); an SDXL
  embedding ({token: {"clip_l", "clip_g"}}) as `write_sdxl_embedding` writes it.

  One token per file: diffusers' `load_textual_inversion` refuses a file with several keys.
  Load it with `pipe.load_textual_inversion(OUT_DIR)` (SDXL: per encoder, see the module
  docstring). Use a lowercase token when N > 1: diffusers' prompt expansion misses mixed-case
  tokens (CLIP lowercases the prompt first).
  """
  if len(embeddings) != 1:
    raise ConfigError(f"a diffusers embedding file holds exactly one token, got {len(embeddings)} "
                      f"({', '.join(embeddings)}); write one folder per token")
  (token, vectors), = embeddings.items()
  path = Path(out_dir) / DIFFUSERS_FILE
  if isinstance(vectors, Mapping):
    return write_sdxl_embedding(path, vectors, metadata, token=token)
  rows = _as_rows(vectors, f"embedding '{token}'")
  meta = {"tokens": json.dumps(list(vector_tokens(token, len(rows))))}
  meta.update({k: str(v) for k, v in (metadata or {}).items()})
  meta["format"] = "pt"
  write_safetensors(path, {token: rows}, meta)
  return path


def write_sdxl_embedding(path, rows: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                         token: str | None = None) -> Path:
  """Writes the SDXL embedding file PATH = {"clip_l": float32 [N, D1], "clip_g": float32 [N, D2]}
  (text_encoder's and text_encoder_2's rows, as A1111, ComfyUI and diffusers' advanced SDXL script
  write them), metadata {"format": "pt", **metadata} (values as strings) and, with `token`,
  "tokens": [tok, tok_1, ...] (read back as the token; else readers take the file name).

  Raises ConfigError when `rows` is not exactly clip_l and clip_g of the same N vectors.
  """
  wanted = list(SDXL_KEYS.values())
  if sorted(rows) != sorted(wanted):
    raise ConfigError(f"an SDXL embedding holds exactly {' and '.join(wanted)} (one row set per "
                      f"text encoder), got {', '.join(map(str, rows)) or 'nothing'}")
  arrays = {k: _as_rows(rows[k], f"SDXL embedding '{k}'") for k in wanted}
  counts = [len(a) for a in arrays.values()]
  if len(set(counts)) > 1:
    raise ConfigError(f"SDXL embedding: clip_l has {counts[0]} vectors and clip_g {counts[1]}; "
                      "each text encoder needs one row per vector")
  meta = {} if token is None else {"tokens": json.dumps(list(vector_tokens(token, counts[0])))}
  meta.update({k: str(v) for k, v in (metadata or {}).items()})
  meta["format"] = "pt"
  path = Path(path)
  write_safetensors(path, arrays, meta)
  return path


def a1111_file_name(token: str) -> str:
  """The A1111 file name for a token: characters bad in file names (<>:"/\\|?* and whitespace)
  dropped, e.g. '<cat-toy>' -> 'cat-toy.safetensors' (the A1111 trigger word is then 'cat-toy')."""
  name = _BAD_NAME_CHARS.sub("", token).strip(".")
  if not name:
    raise ConfigError(f"embedding token '{token}' has no characters usable in a file name")
  return f"{name}.safetensors"


def write_a1111_embedding(token: str, vectors, out_dir) -> Path:
  """Writes OUT_DIR/{trigger}.safetensors = {"emb_params": float32 [N, D]} (A1111, ComfyUI), or
  for an SDXL embedding ({"clip_l", "clip_g"}) those two keys, as A1111 saves SDXL embeddings.

  The trigger word is the file name: `a1111_file_name(token)`. diffusers loads it with
  `pipe.load_textual_inversion(path, token=trigger)` (SDXL: per encoder).
  """
  path = Path(out_dir) / a1111_file_name(token)
  if isinstance(vectors, Mapping):
    return write_sdxl_embedding(path, vectors, {"name": path.stem})
  rows = _as_rows(vectors, f"embedding '{token}'")
  write_safetensors(path, {A1111_KEY: rows}, {"format": "pt", "name": path.stem})
  return path


def write_embedding(path, token: str, rows, metadata: Mapping[str, Any]) -> Path:
  """Writes one embedding as a method's result: PATH = {token: [N, D]}, or an SDXL embedding's
  clip_l/clip_g (the token in the metadata's `tokens`); `metadata` as given (values as strings)."""
  if isinstance(rows, Mapping):
    return write_sdxl_embedding(path, rows, metadata, token=token)
  write_safetensors(Path(path), {token: _as_rows(rows, f"embedding '{token}'")}, metadata)
  return Path(path)


def as_embedding(token_rows: Mapping[str, Any]):
  """A method's new rows {"tokens": [N, D1] (, "tokens_2": [N, D2])} -> an embedding's rows:
  [N, D] with one text encoder, SDXL's {"clip_l", "clip_g"} with two (float32 numpy)."""
  encoders = [e for e, key in TOKEN_ROWS.items() if key in token_rows]
  rows = {SDXL_KEYS[e]: np.asarray(token_rows[TOKEN_ROWS[e]], np.float32) for e in encoders}
  return rows if len(rows) > 1 else next(iter(rows.values()))


def text_widths(params) -> tuple[int, ...]:
  """The token-embedding width of each text encoder of a param tree: (D,), SDXL (D1, D2)."""
  return tuple(int(token_table(params, e).shape[1]) for e in text_encoders(params))


def encoder_rows(rows, params, where: str) -> dict[str, np.ndarray]:
  """An embedding's rows on a model's text encoders: {encoder: float32 [N, D]} (SD 1.x/2.x
  "text_encoder"; SDXL also "text_encoder_2"), or a ConfigError starting with `where` when the
  embedding is for the other family or its widths are not the encoders'."""
  encoders = text_encoders(params)
  if isinstance(rows, Mapping) != (len(encoders) > 1):
    have = "an SDXL embedding (clip_l, clip_g)" if isinstance(rows, Mapping) else (
        "an SD 1.x/2.x embedding (one table)")
    want = "SDXL (two text encoders)" if len(encoders) > 1 else "SD 1.x/2.x (one text encoder)"
    raise ConfigError(f"{where}: {have}, but the model is {want}; use a base model of the family "
                      "it was made for")
  out = ({e: _as_rows(rows[SDXL_KEYS[e]], where) for e in encoders} if isinstance(rows, Mapping)
         else {encoders[0]: _as_rows(rows, where)})
  for e, r in out.items():
    d = token_table(params, e).shape[1]
    if r.shape[1] != d:
      name = f"{SDXL_KEYS[e]} " if len(out) > 1 else ""
      raise ConfigError(f"{where}: {name}width {r.shape[1]}, but this model's "
                        f"{e.replace('_', ' ')} needs {d}")
  return out


def read_embedding_spec(spec: str, width: int | tuple[int, ...] | None = None,
                        sdxl: bool | None = None) -> dict[str, Any]:
  """`--embedding FILE[:TOKEN]`: an existing path is taken whole (its name may hold `:`)."""
  file, _, token = (spec, "", "") if Path(spec).exists() else str(spec).partition(":")
  return read_embedding_file(file, token or None, width=width, sdxl=sdxl)


def read_embedding_file(path, token: str | None = None, width: int | tuple[int, ...] | None = None,
                        sdxl: bool | None = None) -> dict[str, Any]:
  """Reads a Textual Inversion embedding file -> {token: float32 [N, D]}, or for an SDXL
  embedding {token: {"clip_l": [N, D1], "clip_g": [N, D2]}}.

  Accepts a diffusers output folder (its learned_embeds.safetensors) or a safetensors file:
  {token: [N, D] | [D]} (the key is the token), {"emb_params": ...} or {"*": ...} (the file
  stem is the token), `string_to_param.*` (+ optional `string_to_token.*`; the stem is the
  token), or SDXL's {"clip_l", "clip_g"} (the token its metadata `tokens` records, else the
  stem). `token` overrides the token in every layout; `width` checks D (SDXL: (D1, D2), or D1);
  `sdxl`: whether the model the embedding is for is SDXL (True refuses SD 1.x/2.x embeddings,
  False SDXL ones; None takes both).
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
  widths = (width,) if isinstance(width, int) else width
  if set(keys) & set(SDXL_KEYS.values()):
    if sdxl is False:
      raise ModelFileError(f"{path}: an SDXL embedding (keys {', '.join(sorted(tensors))}), but "
                           "the model is SD 1.x/2.x (one text encoder); use an SDXL base model "
                           "with it")
    name = token or _recorded_token(path) or path.stem
    return {name: _sdxl_rows(path, tensors, widths)}
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
  if widths and rows.shape[1] != widths[0]:
    raise ModelFileError(f"{path}: embedding width {rows.shape[1]}, but this model's text encoder "
                         f"needs {widths[0]} (SD 1.x: 768, SD 2.x: 1024)")
  name = token or name
  if not name.strip():
    raise ModelFileError(f"{path}: no token name; pass one (FILE:TOKEN)")
  return {name: rows}


def _sdxl_rows(path: Path, tensors: Mapping[str, np.ndarray], widths) -> dict[str, np.ndarray]:
  """An SDXL file's {"clip_l": [N, D1], "clip_g": [N, D2]}, checked (keys, counts, widths)."""
  wanted = list(SDXL_KEYS.values())
  other = sorted(set(tensors) - set(wanted))
  if other:
    raise ModelFileError(f"{path}: key '{other[0]}' does not belong to an SDXL embedding (keys "
                         "clip_l and clip_g only)")
  missing = [k for k in wanted if k not in tensors]
  if missing:
    raise ModelFileError(f"{path}: an SDXL embedding without '{missing[0]}'; SDXL embeddings hold "
                         "rows for both text encoders (clip_l and clip_g)")
  rows = {k: _as_rows(tensors[k], f"{path}: key '{k}'") for k in wanted}
  counts = [len(r) for r in rows.values()]
  if counts[0] != counts[1]:
    raise ModelFileError(f"{path}: clip_l holds {counts[0]} vectors and clip_g {counts[1]}; an "
                         "SDXL embedding has one row per vector in each")
  for k, d in zip(wanted, widths or ()):
    if rows[k].shape[1] != d:
      raise ModelFileError(f"{path}: {k} width {rows[k].shape[1]}, but this model's text encoder "
                           f"needs {d} (SDXL: clip_l 768, clip_g 1280)")
  return rows


def _recorded_token(path: Path) -> str | None:
  """The first of the `tokens` a persona_jax SDXL embedding records in its metadata, or None."""
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:          # read_adapter has opened it already
    recorded = (f.metadata() or {}).get("tokens")
  try:
    tokens = json.loads(recorded) if recorded else None
  except json.JSONDecodeError:
    return None
  return str(tokens[0]) if isinstance(tokens, list) and tokens else None


class WithEmbeddings(NamedTuple):
  """A pipeline that samples with added embeddings (see `with_embeddings`)."""
  pipe: Any                              # Pipeline; each text encoder's table [V + N, D]
  tokenizer: Any                         # the base tokenizer + the N tokens (ids V .. V+N-1)
  expand_prompt: Callable[[str], str]    # 'tok' -> 'tok tok_1 ...' for multi-vector tokens
  tokenizer_2: Any = None                # SDXL: the second tokenizer + the same tokens (same ids)


def with_embeddings(pipe, embeddings: Mapping[str, Any], params=None) -> WithEmbeddings:
  """The pipeline with embedding rows appended to each text encoder's token table.

  Args:
    pipe: a loaded Pipeline (its vocabulary V must equal its tables' rows).
    embeddings: {token: [N, D] or [D]} (SDXL: {token: {"clip_l": [N, D1], "clip_g": [N, D2]}});
      tokens get ids V, V+1, ... in order, in every tokenizer.
    params: the params to start from (default `pipe.params`), e.g. with LoRAs merged.
  Returns:
    (pipe, tokenizer, expand_prompt, tokenizer_2): sample with `text_to_image(r.pipe, prompts,
    sampling=Sampling(r.pipe.params, r.tokenizer, expand_prompt=r.expand_prompt,
    tokenizer_2=r.tokenizer_2))`. The returned pipe's configs have vocab_size V + N and its
    tokenizers are the ones returned: it is for sampling, not for `save_pipeline` (its tokenizer
    folders are the base ones).
  Raises:
    ConfigError naming a token already in the vocabulary (case-insensitively: CLIP lowercases
    prompts), an embedding for the other model family, or one whose width is not the text
    encoder's.
  """
  params = pipe.params if params is None else params
  encoders = text_encoders(params)
  vocab_rows = token_table(params).shape[0]
  tokens, counts, rows = [], {}, {e: [] for e in encoders}
  for token, value in embeddings.items():
    mapped = encoder_rows(value, params, f"embedding '{token}'")
    n = len(mapped[encoders[0]])
    tokens += vector_tokens(token, n)
    counts[token] = n
    for e in encoders:
      rows[e].append(mapped[e])
  lowered = [t.lower() for t in tokens]
  if len(set(lowered)) != len(lowered):
    raise ConfigError(f"embedding tokens repeat (CLIP matches them case-insensitively): {tokens}")
  base = load_tokenizer(pipe.tokenizer_dir)
  for t, low in zip(tokens, lowered):
    field = "embedding token" if low == t else f"embedding token '{t}' (CLIP lowercases prompts)"
    check_new_tokens(base, [low], (), vocab_rows, fields=(field, "embedding"))
  tokenizers = tokenizers_with_tokens(pipe.tokenizer_dirs, tuple(tokens))
  params, raw, configs = dict(params), dict(pipe.raw_configs), {}
  for e in encoders:
    table = token_table(params, e)                                        # [V, D]
    new_table = jnp.concatenate([table, jnp.asarray(np.concatenate(rows[e]), table.dtype)], axis=0)
    te, emb = params[e], params[e]["embeddings"]
    params[e] = {**te, "embeddings": {**emb, "token_embedding": {**emb["token_embedding"],
                                                                 "embedding": new_table}}}
    raw[e] = {**raw[e], "vocab_size": new_table.shape[0]}
    configs[f"{e}_config"] = dataclasses.replace(getattr(pipe, f"{e}_config"),
                                                 vocab_size=new_table.shape[0])
  out = dataclasses.replace(pipe, params=params, raw_configs=raw, **configs)
  # Fill the cached properties: pipe.tokenizer (and tokenizer_2) agree with the tables.
  out.__dict__.update(zip(("tokenizer", "tokenizer_2"), tokenizers))
  return WithEmbeddings(out, tokenizers[0],
                        _prompt_expander({t: n for t, n in counts.items() if n > 1}),
                        tokenizers[1] if len(tokenizers) > 1 else None)


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
