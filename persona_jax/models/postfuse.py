"""FastComposer's post-fuse MLP (the reference's `FastComposerPostfuseModule`, param names as
there): a subject's noun token t and its image embedding e become

  h = MLP1([t; e]) + t;  h = MLP2(h) (residual);  out = LayerNorm(h)

with MLP = LayerNorm -> Linear -> GELU -> Linear (methods/fastcomposer.py uses it).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp



class MLP(nn.Module):
  """LayerNorm -> Linear(hidden) -> GELU -> Linear(out) (+ x with `residual`)."""
  hidden: int
  out: int
  residual: bool

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(epsilon=1e-5, name="layernorm")(x)
    h = nn.Dense(self.hidden, name="fc1")(h)
    h = nn.Dense(self.out, name="fc2")(nn.gelu(h, approximate=False))
    return h + x if self.residual else h


class PostfuseModule(nn.Module):
  """(text [..., D], image [..., E]) -> [..., D]."""
  dim: int

  @nn.compact
  def __call__(self, text, image):
    h = MLP(self.dim, self.dim, False, name="mlp1")(jnp.concatenate([text, image], -1)) + text
    h = MLP(self.dim, self.dim, True, name="mlp2")(h)
    return nn.LayerNorm(epsilon=1e-5, name="layer_norm")(h)


def init_fuse(rng, text_dim: int, image_dim: int) -> dict:
  return PostfuseModule(text_dim).init(rng, jnp.zeros((1, text_dim)), jnp.zeros((1, image_dim)))["params"]
