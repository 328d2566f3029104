"""BLIP-Diffusion's context text encoder (diffusers' deprecated `ContextCLIPTextModel`,
pipelines/deprecated/blip_diffusion/modeling_ctx_clip.py) in linen.

The CLIP text transformer with the causal mask, whose token embeddings get `ctx_embeddings`
[B, Q, D] (the Q-Former's query embeddings) inserted at `ctx_begin_pos` before the position
embeddings are added: ids [B, L - Q] -> tokens[:p], ctx, tokens[p:] -> [B, L, D]. Without
context it is the plain CLIP text encoder (the pipeline's negative prompt, at full length L).
The final layer norm uses eps 1e-5 whatever the config says, as diffusers' class does.

The layers and param names are our CLIP text encoder's (`text_encoder.py`: `embeddings/
token_embedding`, `encoder/layers_N`, `final_layer_norm`), so a `text_encoder/` folder of the
release (CLIPTextModel's keys) loads as any CLIP text encoder does.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.models.configs import TextEncoderConfig
from persona_jax.models.low_rank import with_low_rank_paths
from persona_jax.models.norms import LayerNorm
from persona_jax.models.text_encoder import CLIPEncoder, CLIPTextEmbeddings, TextEncoderOutput

FINAL_LAYER_NORM_EPS = 1e-5     # ContextCLIPTextTransformer's nn.LayerNorm(embed_dim)


def insert_context(token_embeds, ctx_embeddings, ctx_begin_pos):
  """token_embeds [B, T, D] with ctx_embeddings [B, Q, D] inserted before position
  `ctx_begin_pos` (an int, or [B] ints traced) -> [B, T + Q, D]."""
  b, t, _ = token_embeds.shape
  q = ctx_embeddings.shape[1]
  j = jnp.arange(t + q)[None]                                       # [1, T+Q]
  p = jnp.broadcast_to(jnp.asarray(ctx_begin_pos, jnp.int32).reshape(-1, 1), (b, 1))
  from_ctx = (j >= p) & (j < p + q)
  token_index = jnp.clip(jnp.where(j < p, j, j - q), 0, t - 1)
  ctx_index = jnp.clip(j - p, 0, q - 1)
  tokens = jnp.take_along_axis(token_embeds, token_index[..., None], axis=1)
  ctx = jnp.take_along_axis(ctx_embeddings.astype(token_embeds.dtype), ctx_index[..., None], axis=1)
  return jnp.where(from_ctx[..., None], ctx, tokens)


class ContextCLIPTextModel(nn.Module):
  """The CLIP text encoder with query embeddings spliced into its input."""
  config: TextEncoderConfig

  @nn.compact
  @with_low_rank_paths
  def __call__(self, input_ids, ctx_embeddings=None, ctx_begin_pos=2) -> TextEncoderOutput:
    """Encodes a prompt around a subject's query embeddings.

    Args:
      input_ids: [B, T] CLIP token ids (the pipeline pads them to L - Q with context, L without).
      ctx_embeddings: [B, Q, D] query embeddings, or None for the plain text encoder.
      ctx_begin_pos: where the context goes: an int (the pipeline's 2: after "<bos> a") or [B].
    Returns:
      TextEncoderOutput with `last_hidden_state` [B, T + Q, D] (after the final layer norm) and
      `hidden_states`; no pooled output (diffusers pools at the ids' argmax without shifting it
      past the context; the pipeline does not use it).
    """
    c = self.config
    length = input_ids.shape[1] + (0 if ctx_embeddings is None else ctx_embeddings.shape[1])
    if length > c.max_position_embeddings:
      raise ValueError(f"ContextCLIPTextModel: {input_ids.shape[1]} tokens and the context make "
                       f"{length} positions, more than max_position_embeddings "
                       f"{c.max_position_embeddings}")
    edit = None
    if ctx_embeddings is not None:
      if isinstance(ctx_begin_pos, int) and not 0 <= ctx_begin_pos <= input_ids.shape[1]:
        raise ValueError(f"ContextCLIPTextModel: ctx_begin_pos {ctx_begin_pos} is outside the "
                         f"{input_ids.shape[1]} tokens")
      edit = lambda tokens: insert_context(tokens, ctx_embeddings, ctx_begin_pos)   # noqa: E731
    x = CLIPTextEmbeddings(c, name="embeddings")(input_ids, edit=edit)
    hidden = CLIPEncoder(c, name="encoder")(x)
    last = LayerNorm(FINAL_LAYER_NORM_EPS, c.dtype, c.param_dtype,
                     name="final_layer_norm")(hidden[-1])
    return TextEncoderOutput(last, None, hidden)
