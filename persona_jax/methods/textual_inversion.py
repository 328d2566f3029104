"""Textual Inversion (Gal et al. 2022): learn new token-embedding rows, nothing else.

The placeholder (and, for N vectors, `<tok>_1 ... <tok>_{N-1}`) is appended to the tokenizer
after the base vocabulary, so its ids are V .. V+N-1. The trainable leaf is only those rows,
`tokens` [N, D], initialized from a one-token initializer word; they enter the text encoder as
input embeddings (the base table concatenated with the rows, then indexed), so every existing
row and every other parameter stays bit-identical and the optimizer holds state for N rows only.
On SDXL the token has rows in both text encoders, `tokens` [N, D1] and `tokens_2` [N, D2], each
from the initializer's row of its encoder (the two tokenizers give the token the same ids).

Result: WORKDIR/learned_embeds.safetensors, diffusers' own file ({placeholder: [N, D]}, metadata
format "pt", the tokens and the base model): `pipe.load_textual_inversion(WORKDIR)` reads it, and so
does `persona-jax sample --embedding FILE`. On SDXL the same file holds {"clip_l": [N, D1],
"clip_g": [N, D2]}, the SDXL embedding A1111, ComfyUI and diffusers' advanced SDXL script share
(diffusers loads it per encoder, convert/embedding_formats.py). Exports: diffusers (the same
layout, one file per token) and a1111 (`{"emb_params": [N, D]}`, SDXL clip_l/clip_g; the file
name is the trigger word).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from persona_jax.diffusion.conditioning import (TOKEN_ROWS, TextConditioning, new_token_rows,
                                                token_table)
from persona_jax.errors import ConfigError, ModelFileError
from persona_jax.methods import result_file
from persona_jax.methods.base import Method, ParamSpec, TokenSpec, identity_prompt
from persona_jax.methods.spec import EvalRecipe, MethodSpec, ResultSpec, VerifySpec
from persona_jax.tokenizer import (check_new_tokens, load_tokenizer, tokenizers_with_tokens,
                                   vector_tokens)

RESULT_FILE = "learned_embeds.safetensors"


@dataclasses.dataclass(frozen=True)
class TextualInversionConfig:
  placeholder: str = "<concept>"     # a new token; must not exist in the vocabulary
  initializer: str = "object"        # a word that is one token; its row initializes the vectors
  num_vectors: int = 1


def check_tokens(tokenizer, config: TextualInversionConfig, vocab_rows: int) -> int:
  """Validates placeholder and initializer against the tokenizer; returns the initializer's id."""
  if config.num_vectors < 1:
    raise ConfigError(f"method.num_vectors must be >= 1, got {config.num_vectors}")
  return check_new_tokens(tokenizer, vector_tokens(config.placeholder, config.num_vectors),
                          [config.initializer], vocab_rows)[0]


def vector_expander(placeholder: str, tokens: tuple[str, ...]):
  """prompt -> prompt with a multi-vector placeholder replaced by its vector tokens."""
  if len(tokens) == 1:
    return identity_prompt
  return lambda prompt: prompt.replace(placeholder, " ".join(tokens))


def save(tokens, trainable, context):
  """WORKDIR/learned_embeds.safetensors: {placeholder: [num_vectors, D]} (diffusers' format;
  SDXL: {"clip_l": [N, D1], "clip_g": [N, D2]})."""
  from persona_jax.convert import embedding_formats as ef
  meta = result_file.run_metadata(context, "pt", tokens=json.dumps(list(tokens)))
  path = ef.write_embedding(Path(context.workdir) / RESULT_FILE, tokens[0],
                            ef.as_embedding(trainable), meta)
  return [str(path)]


def make(config: TextualInversionConfig, base_params, tokenizer_dir=None, unet_config=None) -> Method:
  """The Textual Inversion method for a base model (its params give the initializer's row)."""
  import functools
  init_id = check_tokens(load_tokenizer(tokenizer_dir), config, token_table(base_params).shape[0])
  tokens = vector_tokens(config.placeholder, config.num_vectors)

  def init(rng, base):        # {"tokens": [N, D1] (, "tokens_2": [N, D2])}, the initializer's rows
    return new_token_rows(base, [init_id] * len(tokens))

  return Method(name="textual_inversion", params=ParamSpec(init=init),
                conditioning=TextConditioning(token_rows=True),
                tokens=TokenSpec(tokens, vector_expander(config.placeholder, tokens)),
                save=functools.partial(save, tokens))


# ---------------------------------------------------------------------------------------------
# Result, sampling, export, verify.


def load(path) -> result_file.Result:
  """WORKDIR/learned_embeds.safetensors (or the file): weights {placeholder: [N, D]} (SDXL:
  {placeholder: {"clip_l": [N, D1], "clip_g": [N, D2]}})."""
  from persona_jax.convert.embedding_formats import read_embedding_file
  path = Path(path)
  path = path / RESULT_FILE if path.is_dir() else path
  if not path.is_file():
    raise ModelFileError(f"{path}: no Textual Inversion result here (the run has not finished: "
                         "run the same `train` command again to complete it)")
  return result_file.Result(path, read_embedding_file(path), result_file.metadata(path))


def sample(request):
  """The result's rows as the method trained them: new tokens, rows as input embeddings (in
  each text encoder of the model)."""
  from persona_jax.convert.embedding_formats import encoder_rows
  from persona_jax.text_to_image import Sampling
  (placeholder, value), = request.result.weights.items()
  try:
    rows = encoder_rows(value, request.params, f"{request.result.path}: embedding")
  except ConfigError as e:
    raise ModelFileError(str(e)) from None
  tokens = vector_tokens(placeholder, len(rows["text_encoder"]))
  check_new_tokens(request.pipe.tokenizer, tokens, (), token_table(request.params).shape[0],
                   fields=(f"{request.result.path}: its placeholder", ""))
  params = {**request.params, **{TOKEN_ROWS[e]: jnp.asarray(r) for e, r in rows.items()}}
  tokenizers = tokenizers_with_tokens(request.pipe.tokenizer_dirs, tokens)
  return Sampling(params, tokenizers[0], TextConditioning(token_rows=True),
                  vector_expander(placeholder, tokens),
                  tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None)


def export(request, fmt: str):
  from persona_jax.convert import embedding_formats as ef
  embeddings = request.result.weights
  written = []
  for token, rows in embeddings.items():
    if fmt == "a1111":
      written.append(ef.write_a1111_embedding(token, rows, request.out))
    else:
      folder = (request.out if len(embeddings) == 1 else
                request.out / ef.a1111_file_name(token).removesuffix(".safetensors"))
      written.append(ef.write_diffusers_embedding({token: rows}, folder,
                                                  metadata={"base_model": str(request.base)}))
  return written, {}


def load_into_diffusers(ref, token: str, value, params) -> None:
  """An embedding's rows into diffusers' pipeline `ref` with its own loader, once per text
  encoder (`load_textual_inversion(rows, token=, text_encoder=, tokenizer=)`, as diffusers'
  advanced SDXL script's README loads clip_l and clip_g)."""
  import torch

  from persona_jax.convert.embedding_formats import encoder_rows
  for encoder, rows in encoder_rows(value, params, f"embedding '{token}'").items():
    ref.load_textual_inversion(torch.from_numpy(rows), token=token,
                               text_encoder=getattr(ref, encoder),
                               tokenizer=getattr(ref, encoder.replace("text_encoder", "tokenizer")))


def verify_embedding(pipe, model_path, value, **options):
  """An embedding file loaded by diffusers' load_textual_inversion and by persona_jax."""
  from persona_jax.verify import compare_adapter

  def load_both(ref, pipe, tmp):
    from persona_jax.convert.embedding_formats import (read_embedding_spec, text_widths,
                                                       with_embeddings)
    from persona_jax.text_to_image import Sampling
    rows = read_embedding_spec(str(value), width=text_widths(pipe.params), sdxl=pipe.is_sdxl)
    (token, vectors), = rows.items()
    added = with_embeddings(pipe, rows)
    load_into_diffusers(ref, token, vectors, pipe.params)
    return added.pipe, Sampling(added.pipe.params, added.tokenizer,
                                expand_prompt=added.expand_prompt,
                                tokenizer_2=added.tokenizer_2), token
  return compare_adapter(pipe, model_path, load_both, seed=options.get("seed", 0))


SPEC = MethodSpec(
    name="textual_inversion", config=TextualInversionConfig, make=make,
    result=ResultSpec(RESULT_FILE), load=load, sample=sample,
    exports={"diffusers": lambda r: export(r, "diffusers"), "a1111": lambda r: export(r, "a1111")},
    eval={"textual_inversion": EvalRecipe(
        "tuned", "<sks>", "textual_inversion", 300, 5e-3,
        (("method.placeholder", "<sks>"), ("method.initializer", "{cls}"),
         ("data.caption_source", "prompt"), ("data.prompt", "a photo of a <sks>")))},
    verify=VerifySpec("--embedding", "FILE[:TOKEN]",
                      "compare one textual-inversion embedding (diffusers, A1111, SDXL "
                      "clip_l/clip_g)",
                      verify_embedding),
    sdxl=True)
