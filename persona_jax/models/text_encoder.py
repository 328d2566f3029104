"""CLIP text transformer (transformers `CLIPTextModel`, and `CLIPTextModelWithProjection` when
the config says `with_projection`: SDXL's second encoder) in Flax linen.

Param names are transformers' without the `text_model.` level (as transformers >= 5.6 flattens
it): `embeddings/token_embedding/embedding`, `encoder/layers_N/self_attn/q_proj`, `final_layer_norm`.
Methods that add tokens (Textual Inversion, Custom Diffusion, E4T, ...) build `inputs_embeds`
themselves and pass them instead of looking ids up in a bigger table. The encoder layers serve
the CLIP vision tower too (`clip_vision.py`, with `causal=False`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.models.activations import get_activation
from persona_jax.models.attention import dot_product_attention
from persona_jax.models.configs import TextEncoderConfig
from persona_jax.models.low_rank import with_low_rank_paths
from persona_jax.models.norms import LayerNorm


class TextEncoderOutput(NamedTuple):
  last_hidden_state: jnp.ndarray     # [B, L, D] after final_layer_norm
  pooled: jnp.ndarray | None         # [B, D] at the EOS position (None when no ids were given)
  hidden_states: tuple               # L+1 arrays [B, L, D]: embeddings, then each layer (no final LN)
  text_embeds: jnp.ndarray | None = None   # [B, projection_dim]: text_projection(pooled) (WithProjection)


def eos_positions(input_ids, eos_token_id: int):
  """Where transformers pools: argmax of the ids for the legacy eos_token_id 2, else the first EOS."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPAttention(nn.Module):
  config: TextEncoderConfig      # or CLIPVisionConfig: the same field names
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    """Self-attention, causal for text. x: [B, L, D] -> [B, L, D]."""
    c = self.config
    b, l, d = x.shape
    heads = c.num_attention_heads
    dense = functools.partial(nn.Dense, d, dtype=c.dtype, param_dtype=c.param_dtype)
    q = dense(name="q_proj")(x).reshape(b, l, heads, d // heads)      # [B, L, N, Dh]
    k = dense(name="k_proj")(x).reshape(b, l, heads, d // heads)
    v = dense(name="v_proj")(x).reshape(b, l, heads, d // heads)
    h = dot_product_attention(q, k, v, kernel=c.attention, causal=self.causal).astype(c.dtype)
    return dense(name="out_proj")(h.reshape(b, l, d))


class CLIPEncoder(nn.Module):
  """The stack of layers `layers_N`; returns the input and every layer's output."""
  config: TextEncoderConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    hidden = [x]
    for n in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.causal, name=f"layers_{n}")(x)
      hidden.append(x)
    return tuple(hidden)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm layer: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
  config: TextEncoderConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    c = self.config
    ln = functools.partial(LayerNorm, c.layer_norm_eps, c.dtype, c.param_dtype)
    x = x + CLIPAttention(c, self.causal, name="self_attn")(ln(name="layer_norm1")(x))
    return x + CLIPMLP(c, name="mlp")(ln(name="layer_norm2")(x))


class CLIPMLP(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = nn.Dense(c.intermediate_size, dtype=c.dtype, param_dtype=c.param_dtype, name="fc1")(x)
    h = get_activation(c.hidden_act)(h)
    return nn.Dense(c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, name="fc2")(h)


class CLIPTextEmbeddings(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, input_ids=None, inputs_embeds=None, edit=None):
    """Token (or given) embeddings plus position embeddings: [B, L, D]. `edit`, when given, maps
    the token embeddings before positions are added, and may change their length (BLIP-Diffusion's
    context encoder inserts its query embeddings there)."""
    c = self.config
    token = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     name="token_embedding")
    position = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=c.dtype,
                        param_dtype=c.param_dtype, name="position_embedding")
    if inputs_embeds is None:
      inputs_embeds = token(input_ids)
    else:
      token.embedding  # noqa: B018 - creates the param so the tree is the same either way
    if edit is not None:
      inputs_embeds = edit(inputs_embeds)
    length = inputs_embeds.shape[1]
    return inputs_embeds.astype(c.dtype) + position(jnp.arange(length))[None]


class CLIPTextModel(nn.Module):
  """The CLIP text transformer with a causal mask; with `config.with_projection`, transformers'
  CLIPTextModelWithProjection (a bias-free `text_projection` of the pooled output)."""
  config: TextEncoderConfig

  @nn.compact
  @with_low_rank_paths
  def __call__(self, input_ids=None, inputs_embeds=None) -> TextEncoderOutput:
    """Encodes tokens.

    Args:
      input_ids: [B, L] int token ids. Needed for the pooled output.
      inputs_embeds: optional [B, L, D] token embeddings used instead of looking up input_ids
        (the entry point of methods that add tokens).
    Returns:
      TextEncoderOutput; SD 1.x/2.x condition the UNet on `last_hidden_state`.
    """
    if input_ids is None and inputs_embeds is None:
      raise ValueError("CLIPTextModel needs input_ids or inputs_embeds")
    c = self.config
    x = CLIPTextEmbeddings(c, name="embeddings")(input_ids, inputs_embeds)
    hidden = CLIPEncoder(c, name="encoder")(x)
    last = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="final_layer_norm")(hidden[-1])
    pooled = projected = None
    if input_ids is not None:
      pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, c.eos_token_id)]
    if c.with_projection:
      projection = nn.Dense(c.projection_dim, use_bias=False, dtype=c.dtype,
                            param_dtype=c.param_dtype, name="text_projection")
      if pooled is not None:
        projected = projection(pooled)
      else:
        projection(last[:, -1])  # creates the param so the tree is the same either way
    return TextEncoderOutput(last, pooled, hidden, projected)
