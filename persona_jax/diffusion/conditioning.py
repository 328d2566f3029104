"""What the UNet is conditioned on, in training and in sampling: one protocol for every method.

A conditioning is a hashable object (a static argument of the jitted step and sampler):

  input_keys                          the inputs it reads besides `ids` (data/batch.py names: e.g.
                                      `clip_pixels`); sampling passes them (and traced knobs such as
                                      `ip_scale`) beside `ids` and `negative_ids`
  cacheable                           True when its conditioning is the frozen text encoder's
                                      output of `ids` (the data pipeline may then cache it)
  prepare(models, params, inputs)     once per batch or sampling call: what does not depend on the
                                      noisy latent (prompt and image encodings) -> a pytree `state`.
                                      Sampling inputs carry `negative_ids` (the negative prompt),
                                      training batches never do: that is how a conditioning tells
                                      the two apart (e.g. a scale that is 1 in training)
  at(models, params, state, noisy, t, step) -> (UNet kwargs, {name: loss term})
                                      the conditional half at one denoising position: noisy latents
                                      [B, h, w, c], timesteps [B]; `step` is the sampling step
                                      (traced) or None in training. May recompute from `noisy` (E4T)
                                      or switch with `step` (FastComposer's delayed conditioning).
                                      Loss terms are returned as values (training adds them)
  negative(models, params, state) -> UNet kwargs
                                      the unconditional half of classifier-free guidance (sampling)
  sdxl                                True when it conditions SDXL's UNet too (its text path and
                                      added conditioning); sampling refuses others on SDXL

UNet kwargs are `{"encoder_hidden_states": [B, L, D]}` plus, for UNets with add-ons,
`"streams": {name: array}` (models/addons.py), and for SDXL `"added_cond": {"text_embeds": [B, P],
"time_ids": [B, 6]}`. The two halves must have the same tree structure
(the sampler concatenates them on the batch axis; a scalar leaf counts for every example), so a
stream absent from one half is given there at scale 0 (exactly the base model).

`TextConditioning` is the text path every method starts from: the prompt through the text encoder,
with a method's new token rows (`params["tokens"]` [N, D], ids V .. V+N-1, entering as input
embeddings) and, when sampling, an optional clip skip. On SDXL (`models.text_encoder_2`) it is
diffusers' StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states
concatenated, the second's projected pooled output, the micro-conditioning time ids, and zeros
for a negative prompt not given when the folder says `force_zeros_for_empty_prompt`. New tokens
have one row per text encoder (`TOKEN_ROWS`: `tokens` [N, D1] for text_encoder, `tokens_2`
[N, D2] for text_encoder_2, the same ids in both tokenizers), so a method adds them with
`new_token_rows` and never asks which family the base is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from persona_jax.data.batch import (CONTEXT, IDS, IDS_2, NEGATIVE_IDS, NEGATIVE_IDS_2,
                                    NEGATIVE_TIME_IDS, NEGATIVE_ZERO, POOLED, TIME_IDS)
from persona_jax.models.norms import LayerNorm

TOKENS = "tokens"      # the top-level key of added token rows [N, D] (Textual Inversion, Custom Diffusion)
TOKENS_2 = "tokens_2"  # their rows in SDXL's second text encoder [N, D2]
TOKEN_ROWS = {"text_encoder": TOKENS, "text_encoder_2": TOKENS_2}   # encoder -> its new rows' key


def text_encoders(params) -> tuple[str, ...]:
  """The text encoders of a param tree: ("text_encoder",) or, SDXL, ("text_encoder", "text_encoder_2")."""
  return tuple(name for name in TOKEN_ROWS if name in params)


def token_table(params, encoder: str = "text_encoder"):
  """An encoder's token-embedding table [V, D]."""
  return params[encoder]["embeddings"]["token_embedding"]["embedding"]


def new_token_rows(base, init_ids) -> dict:
  """Rows for new tokens in every text encoder of `base`, each a copy of its initializer's row:
  {"tokens": [N, D1] (, "tokens_2": [N, D2])} float32, `init_ids` [N] ids of the initializers."""
  ids = jnp.asarray(init_ids, jnp.int32)
  return {TOKEN_ROWS[e]: jnp.take(token_table(base, e), ids, axis=0).astype(jnp.float32)
          for e in text_encoders(base)}


def unread_text_rules(params) -> tuple[tuple[str, bool], ...]:
  """Selection rules `(regex, False)` for the text-encoder leaves the text conditioning never
  reads, to put before a method's own: on SDXL the first encoder's last layer and final layer
  norm (SDXL reads its penultimate hidden state; the second's last layer feeds the pooled
  output). Empty for SD 1.x/2.x. Training them would give leaves with no gradient."""
  if "text_encoder_2" not in params:
    return ()
  last = max(int(k.rsplit("_", 1)[1]) for k in params["text_encoder"]["encoder"])
  return ((f"text_encoder/(encoder/layers_{last}|final_layer_norm)/.*", False),)


def embed_with_new_rows(params, ids, encoder: str = "text_encoder"):
  """Input embeddings [B, L, D] of ids [B, L] over an encoder's base table with its new rows
  (`params["tokens"]`, or `params["tokens_2"]` for text_encoder_2) appended (ids V .. V+N-1)."""
  base_table = token_table(params, encoder)
  full = jnp.concatenate([base_table, params[TOKEN_ROWS[encoder]].astype(base_table.dtype)], axis=0)
  return jnp.take(full, ids, axis=0)


def encode_prompt(models, params, ids, *, token_rows: bool = False, clip_skip: int | None = None):
  """[B, L] ids -> [B, L, D] text conditioning: the last hidden state, or with `clip_skip` the
  hidden state (clip_skip + 1) from the end through the final layer norm (as diffusers'
  pipelines do). With `token_rows`, `params["tokens"]` are the rows of ids V and above."""
  embeds = embed_with_new_rows(params, ids) if token_rows else None
  out = models.text_encoder.apply({"params": params["text_encoder"]}, ids, embeds)
  if not clip_skip:
    return out.last_hidden_state
  hidden = out.hidden_states[-(clip_skip + 1)]
  c = models.text_encoder.config
  final_ln = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype)
  return final_ln.apply({"params": params["text_encoder"]["final_layer_norm"]}, hidden)


def encode_sdxl_prompt(models, params, ids, ids_2, clip_skip: int | None = None, *,
                       token_rows: bool = False):
  """SDXL's text path, as diffusers' StableDiffusionXLPipeline.encode_prompt.

  ids, ids_2: [B, L] of the two tokenizers. Each encoder's hidden state (clip_skip + 2) from the
  end (the penultimate one by default; no final layer norm) -> concatenated on features. With
  `token_rows`, `params["tokens"]` / `params["tokens_2"]` are the rows of ids V and above.
  Returns (context [B, L, D1 + D2], pooled [B, P]: text_encoder_2's projected pooled output).
  """
  k = -((clip_skip or 0) + 2)
  embeds = (embed_with_new_rows(params, ids) if token_rows else None,
            embed_with_new_rows(params, ids_2, "text_encoder_2") if token_rows else None)
  out_1 = models.text_encoder.apply({"params": params["text_encoder"]}, ids, embeds[0])
  out_2 = models.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2, embeds[1])
  return jnp.concatenate([out_1.hidden_states[k], out_2.hidden_states[k]], axis=-1), out_2.text_embeds


def sdxl_state(models, params, inputs, clip_skip: int | None = None, *,
               token_rows: bool = False) -> dict:
  """SDXL's conditioning of a batch: {"context", "pooled", "time_ids"} (a cached `context` and
  `pooled` used as given) and, when sampling, the negative half's {"negative",
  "negative_pooled", "negative_time_ids"}, zeros where `inputs["negative_zero"]` says so."""
  if CONTEXT in inputs:
    context, pooled = inputs[CONTEXT], inputs[POOLED]
  else:
    context, pooled = encode_sdxl_prompt(models, params, inputs[IDS], inputs[IDS_2], clip_skip,
                                         token_rows=token_rows)
  state = {"context": context, "pooled": pooled, "time_ids": inputs[TIME_IDS]}
  if NEGATIVE_IDS in inputs:
    negative, negative_pooled = encode_sdxl_prompt(models, params, inputs[NEGATIVE_IDS],
                                                   inputs[NEGATIVE_IDS_2], clip_skip,
                                                   token_rows=token_rows)
    keep = ~jnp.asarray(inputs[NEGATIVE_ZERO], bool)                          # [B]
    state.update(negative=negative * keep[:, None, None].astype(negative.dtype),
                 negative_pooled=negative_pooled * keep[:, None].astype(negative_pooled.dtype),
                 negative_time_ids=inputs[NEGATIVE_TIME_IDS])
  return state


def encode_for_cache(models, params, inputs) -> dict:
  """The text conditioning of a batch's ids as the data pipeline caches it when nothing in the
  text path trains: {"context": [B, L, D]} (SDXL: and "pooled" [B, P])."""
  if models.text_encoder_2 is not None:
    context, pooled = encode_sdxl_prompt(models, params, inputs[IDS], inputs[IDS_2])
    return {CONTEXT: context, POOLED: pooled}
  return {CONTEXT: encode_prompt(models, params, inputs[IDS])}


def negative_context(models, params, inputs):
  """The negative prompt's plain text conditioning when sampling (None in training)."""
  if NEGATIVE_IDS not in inputs:
    return None
  return encode_prompt(models, params, inputs[NEGATIVE_IDS])


def delayed(step, start, before: dict, after: dict) -> dict:
  """Delayed subject conditioning: `before` while step < start, then `after` (trees of the same
  structure; `start` an int, a traced scalar or [B] per image, then every leaf is batch-first)."""
  late = jnp.asarray(step) >= jnp.asarray(start)                            # [] or [B]

  def pick(early, now):
    return jnp.where(late.reshape(late.shape + (1,) * (jnp.ndim(now) - late.ndim)), now, early)
  return jax.tree.map(pick, before, after)


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """The prompt's text-encoder output, the same at every step.

  token_rows: the method's new token rows (`params["tokens"]`) enter as input embeddings (they and
    the negative prompt go through them).
  clip_skip: sampling only: an earlier text-encoder layer (through the final layer norm).
  A cached context (`context` [B, L, D] in a training batch) is used as given.
  """
  token_rows: bool = False
  clip_skip: int | None = None
  input_keys = ()
  sdxl = True

  @property
  def cacheable(self) -> bool:
    return not self.token_rows

  def encode(self, models, params, ids):
    return encode_prompt(models, params, ids, token_rows=self.token_rows, clip_skip=self.clip_skip)

  def prepare(self, models, params, inputs):
    """{"context": [B, L, D], "negative": [B, L, D] when sampling} (SDXL: `sdxl_state`'s)."""
    if models.text_encoder_2 is not None or POOLED in inputs:     # SDXL (or its cached batch)
      return sdxl_state(models, params, inputs, self.clip_skip, token_rows=self.token_rows)
    context = inputs[CONTEXT] if CONTEXT in inputs else self.encode(models, params, inputs[IDS])
    negative = (self.encode(models, params, inputs[NEGATIVE_IDS]) if NEGATIVE_IDS in inputs
                else None)
    return {"context": context, "negative": negative}

  def at(self, models, params, state, noisy, t, step):
    if "pooled" in state:
      return {"encoder_hidden_states": state["context"],
              "added_cond": {"text_embeds": state["pooled"], "time_ids": state["time_ids"]}}, {}
    return {"encoder_hidden_states": state["context"]}, {}

  def negative(self, models, params, state):
    if "pooled" in state:
      return {"encoder_hidden_states": state["negative"],
              "added_cond": {"text_embeds": state["negative_pooled"],
                             "time_ids": state["negative_time_ids"]}}
    return {"encoder_hidden_states": state["negative"]}
