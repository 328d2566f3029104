"""BLIP-Diffusion's subject encoder in linen: diffusers' deprecated `Blip2QFormerModel`
(pipelines/deprecated/blip_diffusion/modeling_blip2.py) with its `Blip2VisionModel` and
`ProjLayer`, which turn a subject image and its category's token ids into query embeddings.

  image [B, H, W, 3] -> visual_encoder: ViT (patches, class token, position embeddings,
                        pre_layernorm, pre-norm layers, post_layernorm on every token)
                     -> image features [B, 1+P, Dv]
  category ids [B, T] -> embeddings: word + position embeddings; the learned query tokens
                        [Q, D] put before them; LayerNorm -> [B, Q+T, D]
  encoder: BERT-style post-norm layers: self-attention over [queries; text] (text padding
           masked), cross-attention from the queries to the image features in every
           `cross_attention_frequency`-th layer, then a feed-forward for the queries
           (`intermediate_query`/`output_query`) and one for the text (`intermediate`/`output`)
  proj_layer: x + dense2(quick_gelu(dense1(LayerNorm(x)))) on the queries -> [B, Q, D]

Param names are diffusers' (`visual_encoder/encoder/layers_0/self_attn/qkv`,
`encoder/layer_0/crossattention/attention/key`, `query_tokens`, `proj_layer/dense1`); the
converter (convert/blip_diffusion_weights.py) maps them to the torch keys. Dropout is left out
(the pipeline runs the model in eval mode). Images are channels-last, normalized as BLIP's image
processor does, at the config's `image_size`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from persona_jax.models.activations import get_activation, quick_gelu
from persona_jax.models.attention import dot_product_attention
from persona_jax.models.blip2_config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from persona_jax.models.norms import LayerNorm
from persona_jax.models.text_encoder import CLIPMLP

MASKED = -10000.0     # the additive mask value of diffusers' Q-Former for text padding


class QFormerOutput(NamedTuple):
  query_embeds: jnp.ndarray        # [B, Q, D] proj_layer of the queries: what the pipeline uses
  last_hidden_state: jnp.ndarray   # [B, Q+T, D] the Q-Former's last layer (queries, then text)
  image_embeds: jnp.ndarray        # [B, 1+P, Dv] the vision tower's output (post_layernorm)


# ---------------------------------------------------------------------------------------------
# The vision tower (Blip2VisionModel)


class Blip2VisionEmbeddings(nn.Module):
  config: Blip2VisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    """[B, H, W, C] -> class token then patches (row-major), plus positions: [B, 1+P, D]."""
    c = self.config
    d, p = c.hidden_size, c.patch_size
    init = nn.initializers.normal(0.02)
    class_embedding = self.param("class_embedding", init, (1, 1, d), c.param_dtype)
    position_embedding = self.param("position_embedding", init, (1, c.num_patches + 1, d),
                                    c.param_dtype)
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=c.dtype,
                      param_dtype=c.param_dtype, name="patch_embedding")(pixel_values.astype(c.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)                                  # [B, P, D]
    cls = jnp.broadcast_to(class_embedding.astype(c.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + position_embedding[:, :x.shape[1]].astype(c.dtype)


class Blip2Attention(nn.Module):
  """Self-attention with one fused `qkv` projection (its bias holds q, k and v parts) and
  `projection`."""
  config: Blip2VisionConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, length, d = x.shape
    heads = c.num_attention_heads
    qkv = nn.Dense(3 * d, dtype=c.dtype, param_dtype=c.param_dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, length, 3, heads, d // heads), 3, axis=2)
    h = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], kernel=c.attention)
    return nn.Dense(d, dtype=c.dtype, param_dtype=c.param_dtype,
                    name="projection")(h.astype(c.dtype).reshape(b, length, d))


class Blip2EncoderLayer(nn.Module):
  """Pre-norm: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
  config: Blip2VisionConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    ln = functools.partial(LayerNorm, c.layer_norm_eps, c.dtype, c.param_dtype)
    x = x + Blip2Attention(c, name="self_attn")(ln(name="layer_norm1")(x))
    return x + CLIPMLP(c, name="mlp")(ln(name="layer_norm2")(x))


class Blip2Encoder(nn.Module):
  config: Blip2VisionConfig

  @nn.compact
  def __call__(self, x):
    for n in range(self.config.num_hidden_layers):
      x = Blip2EncoderLayer(self.config, name=f"layers_{n}")(x)
    return x


class Blip2VisionModel(nn.Module):
  """The ViT of BLIP-2. [B, H, W, C] images -> [B, 1+P, D] features, post_layernorm on every
  token (the Q-Former's cross-attention input; diffusers' `last_hidden_state`)."""
  config: Blip2VisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    want = (c.image_size, c.image_size, 3)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != want:
      raise ValueError(f"Blip2VisionModel expects [B, {c.image_size}, {c.image_size}, 3] images "
                       f"(channels-last), got {pixel_values.shape}")
    ln = functools.partial(LayerNorm, c.layer_norm_eps, c.dtype, c.param_dtype)
    x = Blip2VisionEmbeddings(c, name="embeddings")(pixel_values)
    x = Blip2Encoder(c, name="encoder")(ln(name="pre_layernorm")(x))
    return ln(name="post_layernorm")(x)


# ---------------------------------------------------------------------------------------------
# The Q-Former


def _attend(q, k, v, bias):
  """Softmax attention in float32. q: [B, T, N, H], k/v: [B, S, N, H], bias: [B, 1, 1, S] or
  None (added to the logits) -> [B, T, N, H]."""
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


class Blip2QFormerAttention(nn.Module):
  """BERT attention: `attention/{query,key,value}` (keys and values from `context` when given:
  cross-attention), then `output`: LayerNorm(dense(h) + x)."""
  config: Blip2QFormerConfig

  @nn.compact
  def __call__(self, x, context=None, bias=None):
    c = self.config
    b, t, d = x.shape
    heads = c.num_attention_heads
    source = x if context is None else context
    split = lambda y: y.reshape(y.shape[0], y.shape[1], heads, d // heads)
    q, k, v = _QKV(c, name="attention")(x, source)
    h = _attend(split(q), split(k), split(v), bias).astype(c.dtype).reshape(b, t, d)
    return _DenseResidualNorm(c, name="output")(h, x)


class _QKV(nn.Module):
  """The `query`, `key` and `value` projections (diffusers' `attention.attention` level)."""
  config: Blip2QFormerConfig

  @nn.compact
  def __call__(self, x, source):
    c = self.config
    dense = functools.partial(nn.Dense, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype)
    return dense(name="query")(x), dense(name="key")(source), dense(name="value")(source)


class _DenseResidualNorm(nn.Module):
  """BERT's `output` blocks: LayerNorm(dense(h) + residual)."""
  config: Blip2QFormerConfig

  @nn.compact
  def __call__(self, h, residual):
    c = self.config
    h = nn.Dense(c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, name="dense")(h)
    return LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="LayerNorm")(h + residual)


class _Intermediate(nn.Module):
  """BERT's `intermediate`: the activation of a dense widening."""
  config: Blip2QFormerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = nn.Dense(c.intermediate_size, dtype=c.dtype, param_dtype=c.param_dtype, name="dense")(x)
    return get_activation(c.hidden_act)(h)


class Blip2QFormerLayer(nn.Module):
  """One layer over [queries; text] [B, Q+T, D]; `num_queries` = Q."""
  config: Blip2QFormerConfig
  cross_attention: bool
  num_queries: int

  @nn.compact
  def __call__(self, x, image_embeds, bias):
    c, n = self.config, self.num_queries
    h = Blip2QFormerAttention(c, name="attention")(x, bias=bias)
    queries, text = h[:, :n], h[:, n:]
    if self.cross_attention:
      queries = Blip2QFormerAttention(c, name="crossattention")(queries, context=image_embeds)
    queries = _DenseResidualNorm(c, name="output_query")(
        _Intermediate(c, name="intermediate_query")(queries), queries)
    text = _DenseResidualNorm(c, name="output")(_Intermediate(c, name="intermediate")(text), text)
    return jnp.concatenate([queries, text], axis=1)


class Blip2TextEmbeddings(nn.Module):
  """[queries; word + position embeddings of the ids] -> LayerNorm: [B, Q+T, D]."""
  config: Blip2QFormerConfig

  @nn.compact
  def __call__(self, input_ids, query_tokens):
    c = self.config
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.dtype,
                              param_dtype=c.param_dtype)
    words = embed(c.vocab_size, name="word_embeddings")(input_ids)
    positions = embed(c.max_position_embeddings, name="position_embeddings")(
        jnp.arange(input_ids.shape[1]))
    b = input_ids.shape[0]
    queries = jnp.broadcast_to(query_tokens.astype(c.dtype), (b, *query_tokens.shape[1:]))
    x = jnp.concatenate([queries, words + positions[None]], axis=1)
    return LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="LayerNorm")(x)


class ProjLayer(nn.Module):
  """x + dense2(quick_gelu(dense1(LayerNorm(x)))): hidden 4 D, LayerNorm eps 1e-12."""
  config: Blip2QFormerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(nn.Dense, dtype=c.dtype, param_dtype=c.param_dtype)
    h = LayerNorm(1e-12, c.dtype, c.param_dtype, name="LayerNorm")(x)
    h = dense(4 * c.hidden_size, name="dense1")(h)
    return x + dense(c.hidden_size, name="dense2")(quick_gelu(h))


class Blip2QFormerEncoder(nn.Module):
  """The Q-Former's layers `layer_N` (diffusers' `encoder.layer.N`)."""
  config: Blip2Config

  @nn.compact
  def __call__(self, x, image_embeds, bias):
    qc = self.config.qformer_config
    for i in range(qc.num_hidden_layers):
      x = Blip2QFormerLayer(qc, qc.has_cross_attention(i), self.config.num_query_tokens,
                            name=f"layer_{i}")(x, image_embeds, bias)
    return x


class Blip2QFormerModel(nn.Module):
  """The subject encoder of BLIP-Diffusion (diffusers' deprecated Blip2QFormerModel)."""
  config: Blip2Config

  @nn.compact
  def __call__(self, pixel_values, input_ids, attention_mask=None) -> QFormerOutput:
    """Encodes subject images with their categories.

    Args:
      pixel_values: [B, image_size, image_size, 3] channels-last, normalized.
      input_ids: [B, T] the category's BERT token ids ([CLS] ... [SEP], padded to the longest).
      attention_mask: [B, T] 1 for tokens, 0 for padding; None: all tokens.
    Returns:
      QFormerOutput; the pipeline conditions on `query_embeds` [B, num_query_tokens, D].
    """
    c, qc = self.config, self.config.qformer_config
    n = c.num_query_tokens
    if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0]:
      raise ValueError(f"Blip2QFormerModel: input_ids {input_ids.shape} must be [B, T] for "
                       f"{pixel_values.shape[0]} images")
    if input_ids.shape[1] > qc.max_position_embeddings:
      raise ValueError(f"Blip2QFormerModel: {input_ids.shape[1]} category tokens, at most "
                       f"{qc.max_position_embeddings}")
    query_tokens = self.param("query_tokens", nn.initializers.normal(0.02),
                              (1, n, qc.hidden_size), qc.param_dtype)
    image_embeds = Blip2VisionModel(c.vision_config, name="visual_encoder")(pixel_values)
    x = Blip2TextEmbeddings(qc, name="embeddings")(input_ids, query_tokens)
    bias = None
    if attention_mask is not None:
      keep = jnp.concatenate([jnp.ones((input_ids.shape[0], n), jnp.float32),
                              jnp.asarray(attention_mask, jnp.float32)], axis=1)
      bias = ((1.0 - keep) * MASKED)[:, None, None, :]                  # [B, 1, 1, Q+T]
    x = Blip2QFormerEncoder(c, name="encoder")(x, image_embeds.astype(qc.dtype), bias)
    return QFormerOutput(ProjLayer(qc, name="proj_layer")(x[:, :n]), x, image_embeds)
