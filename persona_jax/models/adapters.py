"""Added layers of tuning-free methods that compute something new inside the UNet's transformer
blocks (default off: `UNetConfig.gated_adapter`; their params live in their own subtree).

`GatedSelfAttention` is InstantBooth's adapter (methods.md 6.1), GLIGEN's gated self-attention
without its gated feed-forward (InstantBooth's formula has none):

  y := y + beta * tanh(gamma) * S([y, linear(f_p)])[:, :T]

S is a self-attention over the visual tokens y and the projected patch tokens after one
LayerNorm, keeping the outputs at the T visual positions; gamma is a learnable scalar initialized
at 0 (so a fresh adapter is the identity, exactly), beta a traced scale (1 in training,
about 0.3 at inference).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.models.attention import Attention
from persona_jax.models.extra_conditioning import per_example
from persona_jax.models.norms import LayerNorm


class GatedSelfAttention(nn.Module):
  """Params: linear (Dp -> C, bias), norm (LayerNorm), attn (to_q/to_k/to_v, to_out_0), gamma []."""
  dim: int
  heads: int
  upcast_attention: bool = False
  kernel: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, tokens, scale=None):
    """x: [B, T, C] visual tokens; tokens: [B, P, Dp]; scale: beta, scalar or [B] (None: 1).
    Returns [B, T, C]."""
    b, t, _ = x.shape
    p = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="linear")(tokens.astype(self.dtype))                    # [B, P, C]
    z = jnp.concatenate([x, p], axis=1)                                       # [B, T + P, C]
    z = LayerNorm(1e-5, self.dtype, self.param_dtype, name="norm")(z)
    h = Attention(self.heads, self.dim // self.heads, upcast_attention=self.upcast_attention,
                  kernel=self.kernel, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="attn")(z)[:, :t]                                      # [B, T, C]
    gamma = self.param("gamma", nn.initializers.zeros, (), self.param_dtype)
    gate = per_example(scale, b, 3, jnp.float32) * jnp.tanh(gamma.astype(jnp.float32))
    return x + gate.astype(self.dtype) * h
