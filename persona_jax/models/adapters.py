"""Added layers that compute something new inside the UNet's transformer blocks, for the add-ons
of models/addons.py (default off; their params live under the module they extend).

`GatedSelfAttention` is InstantBooth's adapter (methods.md 6.1), GLIGEN's gated self-attention
without its gated feed-forward (InstantBooth's formula has none):

  y := y + beta * tanh(gamma) * S([y, linear(f_p)])[:, :T]

S is a self-attention over the visual tokens y and the projected patch tokens after one
LayerNorm, keeping the outputs at the T visual positions; gamma is a learnable scalar initialized
at 0 (so a fresh adapter is the identity, exactly), beta a traced scale (1 in training,
about 0.3 at inference).

`DecoupledAttention` is IP-Adapter's decoupled cross-attention (diffusers'
IPAdapterAttnProcessor2_0): a branch of attn2 that attends from attn2's queries to the image
tokens with its own keys and values, added before attn2's shared output projection:

  Z = Attn(Q, K, V) + scale * Attn(Q, K_ip, V_ip)

It runs inside attn2 (models/attention.py's `branches`), so `to_k_ip`/`to_v_ip` (no bias) are
attn2's children: `.../attn2/to_k_ip/kernel` [D, inner] is `ip_adapter.{id}.to_k_ip.weight`
transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from persona_jax.models.attention import Attention, dot_product_attention
from persona_jax.models.norms import LayerNorm


def per_example(scale, batch: int, ndim: int, dtype):
  """A scalar or [B] scale (None: 1) as [B, 1, ...] with `ndim` axes, to multiply activations."""
  s = jnp.ones((), dtype) if scale is None else jnp.asarray(scale).astype(dtype)
  return jnp.broadcast_to(s, (batch,)).reshape((batch,) + (1,) * (ndim - 1))


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


@dataclasses.dataclass(frozen=True)
class DecoupledAttention:
  """A branch of an attention layer (called inside its compact scope: its Dense layers become
  that layer's children `to_k_ip`, `to_v_ip`)."""
  tokens: Any                        # [B, N, D] image tokens (the layer's compute dtype)
  scale: Any                         # scalar or [B]; None: 1
  heads: int
  dim_head: int
  upcast_attention: bool
  kernel: str
  dtype: Any
  param_dtype: Any

  def __call__(self, q):
    """q: [B, T, N, Dh] attn2's queries (upcast when the layer upcasts) -> scale * Attn(Q, K_ip,
    V_ip) [B, T, N, Dh], to be added before the layer's output projection."""
    b = q.shape[0]
    dense = lambda name: nn.Dense(self.heads * self.dim_head, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    k = dense("to_k_ip")(self.tokens).reshape(b, -1, self.heads, self.dim_head)   # [B, N, H, Dh]
    v = dense("to_v_ip")(self.tokens).reshape(b, -1, self.heads, self.dim_head)
    if self.upcast_attention:
      k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    h = dot_product_attention(q, k, v, kernel=self.kernel).astype(self.dtype)
    return per_example(self.scale, b, 4, self.dtype) * h
