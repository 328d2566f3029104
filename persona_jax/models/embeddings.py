"""Sinusoidal timestep embedding and the UNet's time-embedding MLP (diffusers names)."""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.models.activations import get_activation


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000):
  """diffusers' `get_timestep_embedding`. timesteps: [B] (may be fractional) -> [B, dim] float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]   # [B, half]
  sin, cos = jnp.sin(emb), jnp.cos(emb)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> activation -> linear_2."""
  dim: int
  act_fn: str = "silu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
    x = get_activation(self.act_fn)(x)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)
