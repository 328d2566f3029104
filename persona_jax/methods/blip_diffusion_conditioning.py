"""BLIP-Diffusion's conditioning (diffusion/conditioning.py's protocol; methods/blip_diffusion.py),
as diffusers' deprecated `BlipDiffusionPipeline` computes it, for sampling and for training.

Inputs (besides `ids`, and `negative_ids` when sampling):
  blip_pixels          [B, S, S, 3]  the subject image, BLIP-processed (data/blip_images.py)
  blip_category_ids    [B, T] int    the subject category's BERT ids ([CLS] ... [SEP], padded)
  blip_category_mask   [B, T] int    1 for its tokens, 0 for padding
`ids` [B, L - Q] are the CLIP ids of the assembled prompt (`build_prompt`: "a {target} {prompt}"
repeated), padded or cut to the text encoder's positions less the Q query tokens.

Once per batch or sampling call (`prepare`, outside the denoising loop):
  query     the Q-Former on the image and the category -> [B, Q, D] (after its ProjLayer)
  context   the context CLIP text encoder on `ids` with the query embeddings inserted at
            `ctx_begin_pos` (2 in the release: after "<bos> a") -> [B, L, D]
  negative  sampling: the same text encoder on `negative_ids` [B, L] without query embeddings.
The same `context` conditions every denoising step; the negative half is `negative`.
Params read: params["qformer"] (models/blip2.py) and params["text_encoder"] (the context CLIP's,
CLIPTextModel's names); a training method makes either trainable by putting it in its tree.

Training (methods/blip_diffusion_training.py) adds:
  subject_embedding=True  the query embeddings are params["blip_subject"]["embedding"] [1, Q, D]
                          (subject fine-tuning's trained embedding, LAVIS's ctx_embeddings_cache)
                          for every row; the Q-Former does not run and no subject input is read.
  blip_subject_dropped [B] float   1: this example's subject is dropped (stage 2's p 0.15 for
  blip_caption_ids     [B, L] int  guidance): its context is the caption alone, these ids at the
                                   text encoder's full length without query embeddings, as the
                                   pipeline encodes its negative half.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from persona_jax.data.batch import BLIP_PIXELS, CATEGORY_IDS, CATEGORY_MASK, IDS, NEGATIVE_IDS
from persona_jax.models.blip2 import Blip2QFormerModel
from persona_jax.models.blip2_config import Blip2Config
from persona_jax.models.configs import TextEncoderConfig
from persona_jax.models.context_clip import ContextCLIPTextModel

PROMPT_STRENGTH, PROMPT_REPS = 1.0, 20     # the pipeline's defaults
QFORMER = "qformer"                        # the Q-Former's params: params["qformer"]
SUBJECT = "blip_subject"                   # fine-tuning's params["blip_subject"]["embedding"]
DROPPED, CAPTION_IDS = "blip_subject_dropped", "blip_caption_ids"


def build_prompt(prompt: str, target_class: str, prompt_strength: float = PROMPT_STRENGTH,
                 prompt_reps: int = PROMPT_REPS) -> str:
  """The pipeline's `_build_prompt` of one prompt: "a {target} {prompt}" repeated
  int(prompt_strength x prompt_reps) times, joined by ", "."""
  text = f"a {target_class} {prompt.strip()}"
  return ", ".join([text] * int(prompt_strength * prompt_reps))


@dataclasses.dataclass(frozen=True)
class BlipDiffusionConditioning:
  """See the module docstring. `qformer`: the Q-Former's config; `text_encoder`: the context text
  encoder's; `ctx_begin_pos`: where the query embeddings go (model_index.json's)."""
  qformer: Blip2Config
  text_encoder: TextEncoderConfig
  ctx_begin_pos: int = 2
  subject_embedding: bool = False
  cacheable = False
  sdxl = False

  @property
  def prompt_length(self) -> int:
    """L - Q: the prompt's token count beside the query embeddings."""
    return self.text_encoder.max_position_embeddings - self.qformer.num_query_tokens

  @property
  def input_keys(self) -> tuple[str, ...]:
    return () if self.subject_embedding else (BLIP_PIXELS, CATEGORY_IDS, CATEGORY_MASK)

  def query_embeddings(self, params, inputs):
    """[B, Q, D] query embeddings of the subject images and categories (with
    `subject_embedding`: the trained embedding, one per row of inputs["ids"])."""
    if self.subject_embedding:
      embedding = params[SUBJECT]["embedding"]
      return jnp.broadcast_to(embedding, (inputs[IDS].shape[0], *embedding.shape[1:]))
    return Blip2QFormerModel(self.qformer).apply(
        {"params": params[QFORMER]}, inputs[BLIP_PIXELS], inputs[CATEGORY_IDS],
        inputs[CATEGORY_MASK]).query_embeds

  def encode(self, params, ids, query=None):
    """[B, T] ids (with `query` [B, Q, D] inserted at ctx_begin_pos, or none) -> [B, T (+ Q), D]."""
    return ContextCLIPTextModel(self.text_encoder).apply(
        {"params": params["text_encoder"]}, ids, query, self.ctx_begin_pos).last_hidden_state

  def prepare(self, models, params, inputs):
    """{"context": [B, L, D], "negative": [B, L, D] when sampling, else None}."""
    context = self.encode(params, inputs[IDS], self.query_embeddings(params, inputs))
    if DROPPED in inputs:                # stage 2: some subjects dropped (module docstring)
      plain = self.encode(params, inputs[CAPTION_IDS])
      context = jnp.where(inputs[DROPPED][:, None, None] > 0, plain, context)
    negative = self.encode(params, inputs[NEGATIVE_IDS]) if NEGATIVE_IDS in inputs else None
    return {"context": context, "negative": negative}

  def at(self, models, params, state, noisy, t, step):
    return {"encoder_hidden_states": state["context"]}, {}

  def negative(self, models, params, state):
    return {"encoder_hidden_states": state["negative"]}
