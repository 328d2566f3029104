"""IP-Adapter's image projections: CLIP image features -> N tokens of the UNet's cross-attention
width (tencent-ailab/IP-Adapter `ImageProjModel` and `Resampler`; methods.md 7.1, 7.4).

Param names follow the official file's keys (`image_proj.*`, converted in methods/ip_adapter.py):
  ImageProjection  proj/{kernel,bias}, norm/{scale,bias}
  Resampler        latents [1, Q, dim], proj_in, layers_{n}_attn/{norm1,norm2,to_q,to_kv,to_out},
                   layers_{n}_ff/{norm,fc1,fc2}, proj_out, norm_out
Both run in float32; LayerNorm eps 1e-5 and exact GELU, as torch's defaults.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

BASIC, PLUS = "basic", "plus"
DIM_HEAD = 64                        # the Resampler's head width (diffusers infers heads from it)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """kind: basic (pooled image embedding -> num_tokens tokens) or plus (penultimate-layer patch
  features -> num_tokens learned queries through a Perceiver resampler)."""
  kind: str = BASIC
  num_tokens: int = 4                # basic: 4 (diffusers assumes it); plus: the query count (16)
  image_dim: int = 1024              # basic: the encoder's projection_dim; plus: its hidden_size
  cross_attention_dim: int = 768
  depth: int = 4                     # plus only (diffusers reads depth 4 only)
  hidden_dim: int = 0                # plus only: the latents' width; 0: cross_attention_dim
  heads: int = 12                    # plus only
  ff_mult: int = 4                   # plus only


def layer_norm(name):
  return nn.LayerNorm(epsilon=1e-5, name=name)


class ImageProjection(nn.Module):
  """tokens = LayerNorm(Linear(image_embeds).reshape(N, D)): [B, E] -> [B, N, D]."""
  config: ProjectionConfig

  @nn.compact
  def __call__(self, embeds):
    c = self.config
    x = nn.Dense(c.num_tokens * c.cross_attention_dim, name="proj")(embeds.astype(jnp.float32))
    return layer_norm("norm")(x.reshape(x.shape[0], c.num_tokens, c.cross_attention_dim))


class PerceiverAttention(nn.Module):
  """Queries from the latents; keys/values over [x, latents]. x: [B, T, D], latents: [B, Q, D].
  IP-Adapter's heads are DIM_HEAD wide; PhotoMaker v2's perceiver passes 128."""
  heads: int
  dim_head: int = DIM_HEAD

  @nn.compact
  def __call__(self, x, latents):
    b, q_len, dim = latents.shape
    inner = self.heads * self.dim_head
    x, latents = layer_norm("norm1")(x), layer_norm("norm2")(latents)
    q = nn.Dense(inner, use_bias=False, name="to_q")(latents)
    kv = nn.Dense(2 * inner, use_bias=False, name="to_kv")(jnp.concatenate([x, latents], axis=1))
    k, v = jnp.split(kv, 2, axis=-1)
    heads = lambda a: a.reshape(b, -1, self.heads, self.dim_head)
    out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v))          # [B, Q, H, Dh]
    return nn.Dense(dim, use_bias=False, name="to_out")(out.reshape(b, q_len, inner))


class FeedForward(nn.Module):
  mult: int

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = nn.Dense(dim * self.mult, use_bias=False, name="fc1")(layer_norm("norm")(x))
    return nn.Dense(dim, use_bias=False, name="fc2")(nn.gelu(h, approximate=False))


class Resampler(nn.Module):
  """IP-Adapter Plus: [B, T, E] patch features -> [B, Q, D] tokens."""
  config: ProjectionConfig

  @nn.compact
  def __call__(self, features):
    c = self.config
    dim = c.hidden_dim or c.cross_attention_dim
    latents = self.param("latents", lambda k, s: jax.random.normal(k, s) / dim ** 0.5,
                         (1, c.num_tokens, dim))
    latents = jnp.broadcast_to(latents, (features.shape[0],) + latents.shape[1:])
    x = nn.Dense(dim, name="proj_in")(features.astype(jnp.float32))
    for n in range(c.depth):
      latents = PerceiverAttention(c.heads, name=f"layers_{n}_attn")(x, latents) + latents
      latents = FeedForward(c.ff_mult, name=f"layers_{n}_ff")(latents) + latents
    return layer_norm("norm_out")(nn.Dense(c.cross_attention_dim, name="proj_out")(latents))


def projection_model(config: ProjectionConfig) -> nn.Module:
  return Resampler(config) if config.kind == PLUS else ImageProjection(config)


def init_projection(rng, config: ProjectionConfig) -> dict:
  """Fresh params of the projection."""
  shape = (1, config.image_dim) if config.kind == BASIC else (1, 2, config.image_dim)
  return projection_model(config).init(rng, jnp.zeros(shape))["params"]
